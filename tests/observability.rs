//! Lag metrics, the admin endpoints and traces, against the real broker and the real binary.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::Router;
use common::*;

const MINUTE: Duration = Duration::from_secs(60);

async fn scrape(port: u16) -> String {
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(status, 200, "GET /metrics");
    body
}

fn lag_by_partition(text: &str, topic: &str) -> Vec<f64> {
    (0..3)
        .map(|p| {
            metric(
                text,
                "kafka_sidecar_consumer_lag_records",
                &[("topic", topic), ("partition", &p.to_string())],
            )
            .unwrap_or(-1.0)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_rises_while_the_app_is_down_and_returns_to_zero_with_counters_matching_outcomes() {
    require_kafka();
    let topic = unique("lag");
    let dlq = unique("lag-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let app = TestApp::start(|r| {
        if r.value_str().starts_with("poison") {
            Answer::status(422)
        } else {
            Answer::ok()
        }
    })
    .await;
    app.stop();
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    let port = free_port();
    cfg.admin_port = Some(port);
    let _sidecar = Sidecar::start(&cfg);
    let batch = |from: usize| {
        (from..from + 150)
            .map(|i| {
                Out::keyed(
                    format!("k{}", i % 30),
                    if i % 30 == 7 {
                        format!("poison-{i}")
                    } else {
                        format!("v{i}")
                    },
                )
            })
            .collect::<Vec<_>>()
    };

    produce(&topic, batch(0)).await;
    let mut first = vec![];
    let grew = wait_until(MINUTE, || {
        let text = futures::executor::block_on(scrape(port));
        first = lag_by_partition(&text, &topic);
        first.iter().sum::<f64>() == 150.0
    })
    .await;
    assert!(grew, "lag must show the 150 unprocessed records, saw {first:?}");
    produce(&topic, batch(150)).await;
    let mut second = vec![];
    let grew = wait_until(MINUTE, || {
        second = lag_by_partition(&futures::executor::block_on(scrape(port)), &topic);
        second.iter().sum::<f64>() == 300.0
    })
    .await;
    assert!(grew, "lag must reach 300, saw {second:?}");
    for p in 0..3 {
        assert!(
            first[p] > 0.0 && second[p] > first[p],
            "partition {p} lag must rise: {first:?} -> {second:?}"
        );
    }
    let text = scrape(port).await;
    let age = metric(&text, "kafka_sidecar_consumer_lag_seconds", &[("topic", &topic)]).unwrap();
    assert!(age > 0.0, "lag in seconds must be positive while records wait");

    let app = app.restart().await;
    let mut lag = vec![];
    let drained = wait_until(MINUTE, || {
        lag = lag_by_partition(&futures::executor::block_on(scrape(port)), &topic);
        lag == vec![0.0; 3]
    })
    .await;
    assert!(drained, "lag must return to 0, saw {lag:?}");
    let text = scrape(port).await;
    let count = |outcome: &str| {
        metric(
            &text,
            "kafka_sidecar_records_total",
            &[("topic", &topic), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("consumed"), 300.0);
    assert_eq!(count("delivered"), app.delivered_count() as f64);
    assert_eq!(count("delivered"), 290.0);
    assert_eq!(count("dead_lettered"), read_all(&dlq, 1).len() as f64);
    assert_eq!(count("dead_lettered"), 10.0);
    let age = metric(&text, "kafka_sidecar_consumer_lag_seconds", &[("topic", &topic)]).unwrap();
    assert_eq!(age, 0.0);

    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/status")).await;
    assert_eq!(status, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let parts = status["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    for p in parts {
        assert_eq!(p["lag"], 0, "{p}");
        assert_eq!(p["committed"], p["high_watermark"], "{p}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check_metrics() {
    require_kafka();
    let topic = unique("promtool");
    create_topic(&topic, 1).await;
    produce(&topic, (0..20).map(|i| Out::keyed("k", format!("v{i}"))).collect()).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let port = free_port();
    cfg.admin_port = Some(port);
    let _sidecar = Sidecar::start(&cfg);
    assert!(wait_until(MINUTE, || app.delivered_count() == 20).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = scrape(port).await;

    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: run `bash scripts/env.sh up` (installs Debian's prometheus package)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_before_the_assignment_200_while_consuming_and_503_once_shutdown_begins() {
    require_kafka();
    let topic = unique("ready");
    create_topic(&topic, 1).await;
    // Slow deliveries keep the drain going for a while after SIGTERM.
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_secs(2),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let port = free_port();
    cfg.admin_port = Some(port);
    let url = format!("http://127.0.0.1:{port}/readyz");
    // The sidecar bootstraps through a proxy that is not there yet, so it cannot join.
    let proxy_port = free_port();
    let toml = cfg.toml().replace(
        &format!("brokers = \"{}\"", brokers()),
        &format!("brokers = \"127.0.0.1:{proxy_port}\""),
    );
    let mut sidecar = Sidecar::start_toml(&toml);
    assert!(
        wait_until(MINUTE, || futures::executor::block_on(http_get(&url)).0 != 0).await,
        "admin port never opened"
    );
    for _ in 0..10 {
        assert_eq!(http_get(&url).await.0, 503, "not ready before joining the group");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start_proxy(proxy_port).await;

    let mut seen = Vec::new();
    let ready = wait_until(MINUTE, || {
        let (status, _) = futures::executor::block_on(http_get(&url));
        if status != 0 && seen.last() != Some(&status) {
            seen.push(status);
        }
        status == 200
    })
    .await;
    assert!(ready, "never ready: {seen:?}\n{}", sidecar.log());
    assert_eq!(seen.last(), Some(&200), "ready once assigned: {seen:?}");
    assert_eq!(http_get(&format!("http://127.0.0.1:{port}/healthz")).await.0, 200);

    produce(&topic, (0..4).map(|i| Out::keyed(format!("k{i}"), "v")).collect()).await;
    assert!(
        wait_until(MINUTE, || app.max_in_flight() > 0).await,
        "a delivery is in flight"
    );
    sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    let not_ready = wait_until(Duration::from_secs(2), || {
        futures::executor::block_on(http_get(&url)).0 == 503
    })
    .await;
    assert!(not_ready, "readyz must be 503 once shutdown begins");
    let status = sidecar.wait_exit(Duration::from_secs(20)).await.expect("exits");
    assert!(status.success());
}

/// Forwards 127.0.0.1:`port` to the broker.
async fn start_proxy(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let target = brokers();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// An OTLP/HTTP JSON receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn receive_traces(State(c): State<Collector>, body: Bytes) -> &'static str {
    let v: serde_json::Value = serde_json::from_slice(&body).expect("OTLP JSON");
    for rs in v["resourceSpans"].as_array().into_iter().flatten() {
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for span in ss["spans"].as_array().into_iter().flatten() {
                c.spans.lock().unwrap().push(span.clone());
            }
        }
    }
    "{}"
}

fn attributes(span: &serde_json::Value) -> HashMap<String, String> {
    span["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let v = &a["value"];
            let value = v["stringValue"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| match &v["intValue"] {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            (a["key"].as_str().unwrap().to_string(), value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_traceparent_parents_the_delivery_span_and_reaches_the_app() {
    require_kafka();
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_port = listener.local_addr().unwrap().port();
    let router = Router::new()
        .route("/v1/traces", axum::routing::post(receive_traces))
        .with_state(collector.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let topic = unique("traced");
    create_topic(&topic, 1).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let mut out = Out::keyed("k", "traced value");
    out.headers
        .push(("traceparent".into(), format!("00-{trace_id}-{parent_span}-01")));
    produce(&topic, vec![out]).await;

    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.extra =
        format!("[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp_port}/v1/traces\"\nprotocol = \"http/json\"\n");
    let sidecar = Sidecar::start_with_env(&cfg.toml(), &[("OTEL_BSP_SCHEDULE_DELAY", "200")]);

    assert!(wait_until(MINUTE, || app.delivered_count() == 1).await);
    let req = &app.delivered()[0];
    let sent = req
        .headers
        .get("traceparent")
        .expect("the app gets a traceparent")
        .to_str()
        .unwrap()
        .to_string();
    assert!(sent.starts_with(&format!("00-{trace_id}-")), "same trace: {sent}");
    assert!(
        !sent.contains(parent_span),
        "the app's parent is the delivery span, not the producer's span"
    );

    let found = wait_until(MINUTE, || {
        collector.spans.lock().unwrap().iter().any(|s| s["traceId"] == trace_id)
    })
    .await;
    assert!(
        found,
        "the collector never got a span of the record's trace\n{}",
        sidecar.log()
    );
    let spans = collector.spans.lock().unwrap().clone();
    let span = spans.iter().find(|s| s["traceId"] == trace_id).unwrap();
    assert_eq!(
        span["parentSpanId"], parent_span,
        "the record's traceparent is the parent"
    );
    assert_eq!(span["kind"], 5, "SPAN_KIND_CONSUMER");
    let attrs = attributes(span);
    assert_eq!(attrs["messaging.system"], "kafka");
    assert_eq!(attrs["messaging.destination.name"], topic);
    assert_eq!(attrs["messaging.destination.partition.id"], "0");
    assert_eq!(attrs["messaging.kafka.offset"], "0");
    assert_eq!(attrs["messaging.consumer.group.name"], cfg.group);
    assert_eq!(attrs["messaging.operation.type"], "process");
    assert_eq!(attrs["messaging.operation.name"], "process");
    assert_eq!(attrs["messaging.kafka.message.key"], "k");
    assert_eq!(attrs["kafka_sidecar.delivery.attempts"], "1");
    assert_eq!(attrs["kafka_sidecar.delivery.outcome"], "delivered");
    assert_eq!(span["name"], format!("process {topic}"));
    let span_id = span["spanId"].as_str().unwrap();
    assert_eq!(
        sent,
        format!("00-{trace_id}-{span_id}-01"),
        "the app's traceparent names the delivery span"
    );
}

/// Metric names (`kafka_sidecar_*`) a dashboard or rules file queries.
fn queried_metrics(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("kafka_sidecar_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alert_rules_are_valid_and_query_only_metrics_that_exist() {
    require_kafka();
    let chart = common::repo_root().join("helm/kafka-sidecar/files");
    let dashboard = std::fs::read_to_string(chart.join("dashboard.json")).unwrap();
    let rules_path = chart.join("alerts.yaml");
    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard.json is valid JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 10));
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_path)
        .output()
        .expect("promtool is missing: run `bash scripts/env.sh up` (installs Debian's prometheus package)");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let topic = unique("dash");
    create_topic(&topic, 1).await;
    produce(&topic, vec![Out::keyed("k", "v")]).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    // The dedup panel's histogram exists once dedup runs (the embedded store suffices).
    cfg.extra = "[dedup]\nenabled = true\n".into();
    let port = free_port();
    cfg.admin_port = Some(port);
    // Retry tiers on, so that their metrics are exported too.
    let (tier, dlq) = (unique("dash-retry"), unique("dash-dlq"));
    create_topic(&tier, 1).await;
    create_topic(&dlq, 1).await;
    cfg.dlq = Some(dlq);
    cfg.extra += &format!("\n[retry_topics]\nenabled = true\ntiers = [{{ topic = \"{tier}\", delay = \"1s\" }}]\n");
    let _sidecar = Sidecar::start(&cfg);
    assert!(wait_until(MINUTE, || app.delivered_count() == 1).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = scrape(port).await;
    let wanted: Vec<String> = queried_metrics(&dashboard)
        .into_iter()
        .chain(queried_metrics(&rules))
        .collect();
    assert!(wanted.len() >= 10, "{wanted:?}");
    let missing: Vec<&String> = wanted.iter().filter(|m| !text.contains(m.as_str())).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}
