//! The shipped alert rules and dashboard in a real Prometheus (Debian's `prometheus` package,
//! installed by `scripts/env.sh up`), scraping the real sidecar's `/metrics` every second.
//!
//! Test override of the rules (never of the shipped file): [`shorten_rules`] divides every
//! `for:` and every range window (`[10m]`) of `helm/kafka-sidecar/files/alerts.yaml` by 60,
//! so a minute of the shipped rules is a second here (at least 1 s). Thresholds stay as
//! shipped; the outage's backlog therefore carries record timestamps 10 minutes old (standing
//! for the 10-minute outage the test cannot wait for), so `KafkaSidecarLagTooOld` (> 300 s)
//! sees old records.
//!
//! Each test runs its own Prometheus (free port, temporary storage, exemplar storage on) and
//! kills it at the end. The outage test also checks that every dashboard panel's PromQL, with
//! the dashboard's variables filled in, returns data while it runs; both check that a latency
//! exemplar carries a record's trace id (with and without trace export).

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);

fn chart_file(name: &str) -> std::path::PathBuf {
    common::repo_root().join("helm/kafka-sidecar/files").join(name)
}

/// `"10m"` → seconds.
fn seconds(d: &str) -> Option<u64> {
    let unit_at = d.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = d.split_at(unit_at);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return None,
    })
}

/// A duration of the shipped rules, a minute made a second.
fn shorten(d: &str) -> Option<String> {
    seconds(d).map(|s| format!("{}s", (s / 60).max(1)))
}

/// The test override of the shipped rules: `for:` and range windows divided by 60.
fn shorten_rules(rules: &str) -> String {
    let mut out = String::new();
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if let Some(d) = trimmed.strip_prefix("for: ") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!(
                "{indent}for: {}\n",
                shorten(d.trim()).unwrap_or_else(|| d.to_string())
            ));
            continue;
        }
        let mut rest = line;
        while let Some(open) = rest.find('[') {
            let (before, after) = rest.split_at(open + 1);
            out.push_str(before);
            match after.split_once(']') {
                Some((inner, tail)) => {
                    out.push_str(&shorten(inner).unwrap_or_else(|| inner.to_string()));
                    out.push(']');
                    rest = tail;
                }
                None => {
                    rest = after;
                    break;
                }
            }
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

#[test]
fn the_test_override_makes_every_for_and_range_window_of_the_shipped_rules_60_times_shorter() {
    let shipped = std::fs::read_to_string(chart_file("alerts.yaml")).unwrap();
    let short = shorten_rules(&shipped);
    let fors = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.trim_start().strip_prefix("for: "))
            .map(str::to_string)
            .collect()
    };
    let (long_for, short_for) = (fors(&shipped), fors(&short));
    assert!(long_for.len() >= 6, "{long_for:?}");
    assert_eq!(long_for.len(), short_for.len());
    for (l, s) in long_for.iter().zip(&short_for) {
        assert_eq!(seconds(l).map(|x| (x / 60).max(1)), seconds(s), "{l} -> {s}");
    }
    let windows = |text: &str| -> Vec<u64> {
        text.split('[')
            .skip(1)
            .filter_map(|w| w.split_once(']'))
            .filter_map(|(w, _)| seconds(w))
            .collect()
    };
    let (long_w, short_w) = (windows(&shipped), windows(&short));
    assert!(long_w.len() >= 4, "{long_w:?}");
    assert_eq!(long_w.iter().map(|w| (w / 60).max(1)).collect::<Vec<_>>(), short_w);
    // Only durations change: the expressions' thresholds and the text stay as shipped.
    let strip = |t: &str| {
        t.replace(|c: char| c.is_ascii_digit(), "")
            .replace("m]", "s]")
            .replace("for: m", "for: s")
    };
    assert_eq!(strip(&shipped), strip(&short));
    assert!(short.contains("> 1000") && short.contains("> 300"));
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now_secs() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A real Prometheus scraping sidecars, killed on drop.
struct Prometheus {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl Prometheus {
    /// Starts Prometheus scraping `127.0.0.1:<port>` of each `(port, pod)` with labels
    /// `namespace="test"` and `pod`, with the shortened shipped rules; waits until it is ready
    /// and has loaded every rule.
    async fn start(targets: &[(u16, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let shipped = std::fs::read_to_string(chart_file("alerts.yaml")).unwrap();
        let rules = shorten_rules(&shipped);
        assert_ne!(rules, shipped, "the override shortens the rules");
        std::fs::write(dir.path().join("alerts.yaml"), &rules).unwrap();
        let statics: String = targets
            .iter()
            .map(|(port, pod)| {
                format!(
                    "      - targets: [\"127.0.0.1:{port}\"]\n        labels: {{namespace: test, pod: \"{pod}\"}}\n"
                )
            })
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: kafka-sidecar\n    static_configs:\n{statics}",
            dir.path().join("alerts.yaml").display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let bin = std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--enable-feature=exemplar-storage")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the Prometheus server `{bin}` ({e}): install Debian's prometheus package \
                     with `bash scripts/env.sh up` (or `apt-get install prometheus`), or set PROMETHEUS to its path"
                )
            });
        let p = Self {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        let ready = wait_until(MINUTE, || {
            futures::executor::block_on(http_get(&format!("{}/-/ready", p.url))).0 == 200
        })
        .await;
        assert!(ready, "Prometheus never became ready\n{}", p.log());
        let names: BTreeSet<String> = shipped
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("- alert: "))
            .map(|n| n.trim().to_string())
            .collect();
        assert!(names.len() >= 9, "{names:?}");
        let mut loaded = BTreeSet::new();
        let all = wait_until(MINUTE, || {
            let v = futures::executor::block_on(p.api("/api/v1/rules"));
            loaded = v["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .filter(|r| r["health"] != "err" && r["duration"].as_f64().is_some_and(|d| d <= 15.0))
                .filter_map(|r| r["name"].as_str().map(str::to_string))
                .collect();
            loaded == names
        })
        .await;
        assert!(all, "rules loaded {loaded:?}, shipped {names:?}\n{}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET an API path; the JSON answer (`Null` when Prometheus does not answer).
    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(&format!("{}{path}", self.url)).await;
        if status != 200 {
            return Value::Null;
        }
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// An instant query's result vector.
    async fn query(&self, q: &str) -> Vec<Value> {
        let v = self.api(&format!("/api/v1/query?query={}", encode(q))).await;
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The first sample's value of an instant query.
    async fn value(&self, q: &str) -> Option<f64> {
        self.query(q)
            .await
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse().ok())
    }

    /// Active alerts (pending and firing).
    async fn alerts(&self) -> Vec<Value> {
        let v = self.api("/api/v1/alerts").await;
        v["data"]["alerts"].as_array().cloned().unwrap_or_default()
    }

    /// Names of firing alerts whose labels include `labels`.
    async fn firing(&self, labels: &[(&str, &str)]) -> BTreeSet<String> {
        self.alerts()
            .await
            .into_iter()
            .filter(|a| a["state"] == "firing")
            .filter(|a| labels.iter().all(|(k, v)| a["labels"][*k] == *v))
            .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_string))
            .collect()
    }

    /// Trace ids of the exemplars of `metric` stored in the last 10 minutes.
    async fn exemplar_trace_ids(&self, metric: &str) -> Vec<String> {
        let now = now_secs();
        let v = self
            .api(&format!(
                "/api/v1/query_exemplars?query={}&start={}&end={}",
                encode(metric),
                now - 600.0,
                now + 60.0
            ))
            .await;
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["exemplars"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["labels"]["trace_id"].as_str().map(str::to_string))
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("---- prometheus log (last 30 lines) ----");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn require_redis() {
    if let Err(e) = std::net::TcpStream::connect_timeout(&"127.0.0.1:6379".parse().unwrap(), Duration::from_secs(3)) {
        panic!(
            "Redis is not reachable at 127.0.0.1:6379 ({e}). Start the test environment with `bash scripts/env.sh up`."
        );
    }
}

/// Every panel target of the dashboard: (name, PromQL with the variables filled in: All for
/// namespace and pod, 10 s for `$__rate_interval`).
fn panel_queries() -> Vec<(String, String)> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(chart_file("dashboard.json")).unwrap()).unwrap();
    let mut out = vec![];
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", ".*")
                .replace("$pod", ".*")
                .replace("$__rate_interval", "10s");
            assert!(!expr.contains('$'), "unfilled variable in {expr}");
            out.push((
                format!("panel {} \"{}\" {}", panel["id"], panel["title"], t["refId"]),
                expr,
            ));
        }
    }
    out
}

/// Evaluates every panel query every 2 s until `stop`; keeps the names of those that returned
/// at least one sample that is a number (not NaN).
fn watch_panels(prom: Arc<Prometheus>, stop: Arc<AtomicBool>) -> Arc<Mutex<BTreeSet<String>>> {
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let queries = panel_queries();
    let s = seen.clone();
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (name, q) in &queries {
                let data = prom.query(q).await.iter().any(|sample| {
                    sample["value"][1]
                        .as_str()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| !v.is_nan())
                });
                if data {
                    s.lock().unwrap().insert(name.clone());
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    seen
}

/// Produces `count` records to `partition` with keys `{prefix}{i}` and record timestamps
/// `age` in the past.
fn produce_aged(topic: &str, partition: i32, prefix: &str, count: usize, age: Duration) {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let ts = (SystemTime::now() - age)
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for i in 0..count {
        let key = format!("{prefix}{i}");
        let value = format!("outage-{i}");
        let rec = BaseRecord::to(topic)
            .key(key.as_bytes())
            .payload(value.as_bytes())
            .partition(partition)
            .timestamp(ts);
        send_when_queue_has_room(&producer, rec, Duration::from_millis(50));
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

fn traced(key: &str, trace_id: &str, partition: i32) -> Out {
    let mut out = Out::keyed(key, "traced");
    out.partition = Some(partition);
    out.headers
        .push(("traceparent".into(), format!("00-{trace_id}-00f067aa0ba902b7-01")));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_and_an_app_outage_fire_their_alerts_all_resolve_when_the_app_returns_and_every_panel_has_data() {
    require_kafka();
    require_redis();
    let topic = unique("prom-outage");
    let dlq = unique("prom-outage-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let tier = unique("prom-outage-retry");
    create_topic(&tier, 1).await;
    let app = TestApp::start(|r| {
        if r.value_str().starts_with("poison") {
            Answer::status(422)
        } else {
            Answer::ok()
        }
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    cfg.mode = "batch";
    let port = free_port();
    cfg.admin_port = Some(port);
    // Batch mode, dedup on Redis by record key, a rate limit the drain reaches, a breaker that
    // opens after 5 failed requests and stays open 8 s (longer than the shortened `for: 2s`),
    // and a retry tier (the retry panel; 422 and an outage never move a record to a tier).
    cfg.extra = format!(
        "[batch]\nmax_records = 20\nlinger = \"10ms\"\n\
         [rate_limit]\nrecords_per_second = 1000.0\n\
         [breaker]\nmin_requests = 5\ncool_down = \"8s\"\nmax_cool_down = \"8s\"\n\
         [dedup]\nenabled = true\nredis_url = \"redis://127.0.0.1:6379/0\"\nkey = \"key\"\n\
         [retry_topics]\nenabled = true\ntiers = [{{ topic = \"{tier}\", delay = \"1s\" }}]\n"
    );
    // Few records in memory: most of the outage's backlog stays unread.
    let toml = cfg
        .toml()
        .replace("[pipeline]\n", "[pipeline]\nmax_in_flight_records = 60\n");
    let sidecar = Sidecar::start_toml(&toml);
    let pod = "outage-0";
    let prom = Arc::new(Prometheus::start(&[(port, pod)]).await);
    let stop_panels = Arc::new(AtomicBool::new(false));
    let panels = watch_panels(prom.clone(), stop_panels.clone());

    // The topic's counters are scraped at 0 before the first dead letter.
    let zero = format!("kafka_sidecar_records_total{{topic=\"{topic}\",outcome=\"dead_lettered\"}} == 0");
    let mut q = vec![];
    assert!(
        wait_until(MINUTE, || {
            q = futures::executor::block_on(prom.query(&zero));
            !q.is_empty()
        })
        .await,
        "Prometheus never saw the dead_lettered counter at 0\n{}",
        sidecar.log()
    );

    // 1. Healthy traffic with duplicates and five poison records (partitions 0 and 1 only).
    let mut first = vec![];
    for i in 0..200 {
        let mut o = Out::keyed(format!("a{i}"), format!("v{i}"));
        o.partition = Some(i % 2);
        first.push(o);
    }
    for i in 0..100 {
        let mut o = Out::keyed(format!("a{i}"), format!("again{i}"));
        o.partition = Some(i % 2);
        first.push(o);
    }
    for i in 0..5 {
        let mut o = Out::keyed(format!("p{i}"), format!("poison-{i}"));
        o.partition = Some(0);
        first.push(o);
    }
    produce(&topic, first).await;
    let labels = [("topic", topic.as_str())];
    let mut firing = BTreeSet::new();
    let fired = wait_until(MINUTE, || {
        firing = futures::executor::block_on(prom.firing(&labels));
        firing.contains("KafkaSidecarDeadLetters")
    })
    .await;
    assert!(
        fired,
        "KafkaSidecarDeadLetters never fired: {firing:?}\n{}",
        sidecar.log()
    );
    assert_eq!(read_all(&dlq, 1).len(), 5, "the five poison records are dead-lettered");
    let dedup = format!("sum(kafka_sidecar_records_total{{topic=\"{topic}\",outcome=\"deduplicated\"}})");
    assert!(
        wait_until(MINUTE, || futures::executor::block_on(prom.value(&dedup))
            == Some(100.0))
        .await,
        "the 100 repeated keys are deduplicated"
    );

    // 2. The app goes down while a backlog of old records (10 minutes) keeps arriving, on
    //    partitions 0 and 1 and then on partition 2, which the sidecar has never read.
    app.stop();
    let stop_producing = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (topic, stop, produced) = (topic.clone(), stop_producing.clone(), produced.clone());
        tokio::task::spawn_blocking(move || {
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let partition = if round < 10 { round % 2 } else { round % 3 };
                produce_aged(&topic, partition, &format!("o{round}-"), 100, Duration::from_secs(600));
                produced.fetch_add(100, std::sync::atomic::Ordering::Relaxed);
                round += 1;
                std::thread::sleep(Duration::from_millis(400));
            }
        })
    };
    let wanted = [
        "KafkaSidecarCircuitOpen",
        "KafkaSidecarLagGrowing",
        "KafkaSidecarLagTooOld",
    ];
    let mut firing = BTreeSet::new();
    let all_fired = wait_until(2 * MINUTE, || {
        let by_pod = futures::executor::block_on(prom.firing(&[("pod", pod)]));
        firing = by_pod;
        firing.extend(futures::executor::block_on(prom.firing(&labels)));
        wanted.iter().all(|w| firing.contains(*w))
    })
    .await;
    assert!(
        all_fired,
        "during the outage {wanted:?} must fire, firing: {firing:?}\n{}",
        sidecar.log()
    );
    // The partition never read shows lag in records and in seconds.
    let lag2 = format!("kafka_sidecar_consumer_lag_records{{topic=\"{topic}\",partition=\"2\"}}");
    let age2 = format!("kafka_sidecar_consumer_lag_seconds{{topic=\"{topic}\",partition=\"2\"}}");
    let mut seen = (None, None);
    let shown = wait_until(MINUTE, || {
        seen = (
            futures::executor::block_on(prom.value(&lag2)),
            futures::executor::block_on(prom.value(&age2)),
        );
        seen.0.is_some_and(|l| l > 0.0) && seen.1.is_some_and(|s| s > 300.0)
    })
    .await;
    let (_, status) = http_get(&format!("http://127.0.0.1:{port}/status")).await;
    assert!(
        shown,
        "lag of the unread partition 2 (records, seconds): {seen:?}\n{status}"
    );
    let status: Value = serde_json::from_str(&status).unwrap();
    let p2 = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["partition"] == 2)
        .cloned()
        .unwrap();
    assert_eq!(p2["unfinished"], 0, "partition 2 has nothing read: {p2}");
    assert!(
        app.requests().iter().all(|r| r.partition != 2),
        "no record of partition 2 reached the app before the outage"
    );
    stop_producing.store(true, std::sync::atomic::Ordering::Relaxed);
    producer.await.unwrap();
    let produced = produced.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        produced > 1000,
        "the backlog passes the lag alert's 1000 records: {produced}"
    );

    // 3. The app comes back: the backlog drains and every alert resolves.
    let app = app.restart().await;
    let lag = format!("sum(kafka_sidecar_consumer_lag_records{{topic=\"{topic}\"}})");
    let mut left = None;
    let drained = wait_until(2 * MINUTE, || {
        left = futures::executor::block_on(prom.value(&lag));
        left == Some(0.0)
    })
    .await;
    assert!(drained, "lag must return to 0, left {left:?}\n{}", sidecar.log());
    let mut active = vec![];
    let resolved = wait_until(MINUTE, || {
        active = futures::executor::block_on(prom.alerts());
        active.is_empty()
    })
    .await;
    assert!(resolved, "every alert resolves once the app is back: {active:#?}");
    assert_eq!(
        app.delivered()
            .iter()
            .filter(|r| r.value_str().starts_with("outage-"))
            .count(),
        produced,
        "every backlog record is delivered"
    );

    // 4. A record with a sampled traceparent, traces not exported: its trace id is the exemplar.
    let trace_id = "5bf92f3577b34da6a3ce929d0e0e4737";
    produce(&topic, vec![traced("traced-0", trace_id, 1)]).await;
    let mut ids = vec![];
    let found = wait_until(MINUTE, || {
        ids = futures::executor::block_on(prom.exemplar_trace_ids("kafka_sidecar_delivery_duration_seconds_bucket"));
        ids.iter().any(|id| id == trace_id)
    })
    .await;
    assert!(found, "no delivery exemplar with trace id {trace_id}: {ids:?}");

    stop_panels.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = panels.lock().unwrap().clone();
    let missing: Vec<String> = panel_queries()
        .into_iter()
        .filter(|(name, _)| !seen.contains(name))
        .map(|(name, q)| format!("{name}: {q}"))
        .collect();
    assert!(
        missing.is_empty(),
        "dashboard queries that never returned data:\n{}",
        missing.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_alert_fires_during_a_healthy_run_of_10000_records_and_exported_traces_give_exemplars() {
    require_kafka();
    let topic = unique("prom-healthy");
    create_topic(&topic, 3).await;
    let records: Vec<Out> = (0..10_000)
        .map(|i| Out::keyed(format!("k{i}"), format!("v{i}")))
        .collect();
    produce(&topic, records).await;
    let app = TestApp::start(|_| Answer::ok()).await;

    // An OTLP/HTTP receiver that accepts every export, so traces are exported for real.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp_port = listener.local_addr().unwrap().port();
    let exports = Arc::new(AtomicUsize::new(0));
    let counted = exports.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async { "{}" }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let mut cfg = SidecarConfig::new(&topic, &app);
    let port = free_port();
    cfg.admin_port = Some(port);
    cfg.extra =
        format!("[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp_port}/v1/traces\"\nprotocol = \"http/json\"\n");
    let pod = "healthy-0";
    let prom = Prometheus::start(&[(port, pod)]).await;
    let sidecar = Sidecar::start_with_env(&cfg.toml(), &[("OTEL_BSP_SCHEDULE_DELAY", "200")]);

    let mut ever_fired = BTreeSet::new();
    let delivered = format!("sum(kafka_sidecar_records_total{{topic=\"{topic}\",outcome=\"delivered\"}})");
    let mut last = None;
    let done = wait_until(3 * MINUTE, || {
        ever_fired.extend(futures::executor::block_on(prom.firing(&[])));
        last = futures::executor::block_on(prom.value(&delivered));
        last == Some(10_000.0)
    })
    .await;
    assert!(
        done,
        "Prometheus must see 10000 delivered, saw {last:?}\n{}",
        sidecar.log()
    );
    assert_eq!(app.delivered_count(), 10_000);

    // A traced record last: its exported delivery span's trace id is the exemplar.
    let trace_id = "6bf92f3577b34da6a3ce929d0e0e4738";
    produce(&topic, vec![traced("traced-1", trace_id, 0)]).await;
    let mut ids = vec![];
    let found = wait_until(MINUTE, || {
        ever_fired.extend(futures::executor::block_on(prom.firing(&[])));
        ids = futures::executor::block_on(prom.exemplar_trace_ids("kafka_sidecar_delivery_duration_seconds_bucket"));
        ids.iter().any(|id| id == trace_id)
    })
    .await;
    assert!(found, "no delivery exemplar with trace id {trace_id}: {ids:?}");
    assert!(
        ids.iter()
            .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())),
        "{ids:?}"
    );
    let e2e = prom
        .exemplar_trace_ids("kafka_sidecar_end_to_end_latency_seconds_bucket")
        .await;
    assert!(!e2e.is_empty(), "end-to-end latency has exemplars");
    assert!(
        wait_until(MINUTE, || exports.load(std::sync::atomic::Ordering::Relaxed) > 0).await,
        "traces were exported"
    );

    // Some more evaluations after the run, then: nothing fired, now or in between.
    for _ in 0..10 {
        ever_fired.extend(prom.firing(&[]).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        ever_fired.is_empty(),
        "alerts fired during a healthy run: {ever_fired:?}"
    );
    let fired = prom.query("max_over_time(ALERTS{alertstate=\"firing\"}[10m])").await;
    assert!(fired.is_empty(), "alerts fired during a healthy run: {fired:#?}");
    let up = prom.value(&format!("up{{pod=\"{pod}\"}}")).await;
    assert_eq!(up, Some(1.0), "Prometheus scraped the sidecar");
}
