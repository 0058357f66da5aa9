//! Dead-letter writes that the broker refuses: the real binary, the real broker, a real app.
//!
//! A record too large for the DLQ topic once the `x-dlq-*` headers are added is dead-lettered
//! without its value (`x-dlq-dropped`); a DLQ topic that does not exist keeps the record
//! (not committed, lane blocked), shows in metrics, `/status` and `/readyz`, and the record
//! goes through once the topic exists.

mod common;

use std::time::Duration;

use common::*;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

const MINUTE: Duration = Duration::from_secs(60);

/// Creates a one-partition topic with a `max.message.bytes` limit.
async fn create_topic_with_max_bytes(name: &str, max_message_bytes: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let max = max_message_bytes.to_string();
    let topic = NewTopic::new(name, 1, TopicReplication::Fixed(1)).set("max.message.bytes", &max);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(&[topic], &opts).await.expect("create_topics") {
        r.unwrap_or_else(|(t, e)| panic!("failed to create topic {t}: {e}"));
    }
}

/// `/status` as JSON; `Null` while the admin server is not up yet.
async fn status_json(port: u16) -> serde_json::Value {
    let (code, body) = http_get(&format!("http://127.0.0.1:{port}/status")).await;
    if code != 200 {
        return serde_json::Value::Null;
    }
    serde_json::from_str(&body).expect("/status is JSON")
}

async fn scrape(port: u16) -> String {
    http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_for_the_dlq_once_headers_are_added_is_dead_lettered_without_its_value() {
    require_kafka();
    let topic = unique("dlq-too-large");
    let dlq = unique("dlq-too-large-dlq");
    // The source topic takes the record; the DLQ topic is a little smaller, and the x-dlq-*
    // headers (about 300 bytes) push the dead letter over its limit.
    create_topic_with_max_bytes(&topic, 8192).await;
    create_topic_with_max_bytes(&dlq, 8000).await;
    let big = "b".repeat(8000);
    produce(&topic, vec![Out::keyed("k-big", big.clone())]).await;
    produce(
        &topic,
        vec![Out::keyed("k-small", "poison-small"), Out::keyed("k-ok", "fine")],
    )
    .await;
    // A key too large for the DLQ even without the value: key and headers go too.
    let mut big_key = Out::keyed("K".repeat(7900), "poison-big-key");
    big_key.headers.push(("origin".into(), "test".into()));
    produce(&topic, vec![big_key]).await;
    let app = TestApp::start(|r| {
        if r.value_str() == "fine" {
            Answer::ok()
        } else {
            Answer::status(422)
        }
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    let port = free_port();
    cfg.admin_port = Some(port);
    let sidecar = Sidecar::start(&cfg);

    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 1, MINUTE).await;
    assert_eq!(committed, ends, "committed to the end\n{}", sidecar.log());
    let letters = read_all(&dlq, 1);
    assert_eq!(letters.len(), 3, "every poison record is dead-lettered: {letters:?}");
    let big_letter = letters
        .iter()
        .find(|l| l.headers.get("x-dlq-source-offset").map(String::as_str) == Some("0"))
        .expect("the big record is in the DLQ");
    assert_eq!(big_letter.value, None, "written without its value");
    assert_eq!(big_letter.key.as_deref(), Some(&b"k-big"[..]), "the key stays");
    let h = &big_letter.headers;
    assert_eq!(h.get("x-dlq-dropped").map(String::as_str), Some("value"));
    assert_eq!(h.get("x-dlq-source-topic"), Some(&topic));
    assert_eq!(h.get("x-dlq-source-partition").map(String::as_str), Some("0"));
    assert_eq!(h.get("x-dlq-error-class").map(String::as_str), Some("http_422"));
    let small_letter = letters
        .iter()
        .find(|l| l.headers.get("x-dlq-source-offset").map(String::as_str) == Some("1"))
        .expect("the small record is in the DLQ");
    assert_eq!(
        small_letter.value.as_deref(),
        Some(&b"poison-small"[..]),
        "a record that fits keeps its value"
    );
    assert!(!small_letter.headers.contains_key("x-dlq-dropped"));
    let stripped = letters
        .iter()
        .find(|l| l.headers.get("x-dlq-source-offset").map(String::as_str) == Some("3"))
        .expect("the big-key record is in the DLQ");
    assert_eq!((stripped.key.as_deref(), stripped.value.as_deref()), (None, None));
    assert_eq!(
        stripped.headers.get("x-dlq-dropped").map(String::as_str),
        Some("value,key,headers")
    );
    assert!(
        !stripped.headers.contains_key("origin"),
        "original headers are left out"
    );
    assert_eq!(stripped.headers.get("x-dlq-source-topic"), Some(&topic));

    let text = scrape(port).await;
    assert_eq!(
        metric(&text, "kafka_sidecar_dlq_values_dropped_total", &[]),
        Some(2.0),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "kafka_sidecar_dlq_errors_total",
            &[("class", "message_too_large")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    let status = status_json(port).await;
    assert_eq!(status["dlq"]["healthy"], true, "{status}");
    assert_eq!(status["dlq"]["values_dropped"], 2, "{status}");
    assert_eq!(http_get(&format!("http://127.0.0.1:{port}/readyz")).await.0, 200);
    assert!(sidecar.log().contains("record too large for the dead-letter topic"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dlq_topic_keeps_the_record_reports_it_and_writes_it_once_the_topic_exists() {
    require_kafka();
    let topic = unique("dlq-missing");
    let dlq = unique("dlq-missing-dlq");
    create_topic(&topic, 1).await;
    // One key: the poison record blocks its lane, so "fine-2" waits behind it.
    produce(
        &topic,
        vec![
            Out::keyed("k", "fine-0"),
            Out::keyed("k", "poison-1"),
            Out::keyed("k", "fine-2"),
        ],
    )
    .await;
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
    let port = free_port();
    cfg.admin_port = Some(port);
    // librdkafka fails writes to a topic it does not know after this long (default 30 s).
    cfg.extra = "[dlq.properties]\n\"topic.metadata.propagation.max.ms\" = \"2000\"\n".into();
    let sidecar = Sidecar::start(&cfg);

    let mut status = serde_json::Value::Null;
    let reported = wait_until(MINUTE, || {
        status = futures::executor::block_on(status_json(port));
        status["dlq"]["healthy"] == false
    })
    .await;
    assert!(
        reported,
        "/status never reported the DLQ problem: {status}\n{}",
        sidecar.log()
    );
    assert_eq!(status["dlq"]["error_class"], "unknown_topic", "{status}");
    assert_eq!(status["dlq"]["blocked_records"], 1, "{status}");
    let fix = status["dlq"]["fix"].as_str().unwrap_or_default();
    assert!(fix.contains(&format!("create the DLQ topic {dlq}")), "{status}");
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{port}/readyz")).await.0,
        503,
        "not ready while the DLQ refuses records"
    );
    let text = scrape(port).await;
    assert!(metric(&text, "kafka_sidecar_dlq_errors_total", &[("class", "unknown_topic")]).unwrap_or(0.0) >= 1.0);
    assert_eq!(
        metric(&text, "kafka_sidecar_dlq_blocked_records", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(&text, "kafka_sidecar_ready", &[]), Some(0.0), "{text}");

    // Retries go on (backoff capped at 1 s here); the record is kept, nothing passes it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        committed(&cfg.group, &topic, 1),
        vec![1],
        "committed up to the poison record, not past it"
    );
    assert!(
        app.delivered().iter().all(|r| r.value_str() != "fine-2"),
        "the lane stays blocked behind the kept record"
    );
    let text = scrape(port).await;
    assert!(
        metric(&text, "kafka_sidecar_dlq_errors_total", &[("class", "unknown_topic")]).unwrap_or(0.0) >= 2.0,
        "the write is retried: {text}"
    );
    let log = sidecar.log();
    assert_eq!(
        log.matches("cannot write to the dead-letter topic").count(),
        1,
        "the cause is logged once, with the fix:\n{log}"
    );

    create_topic(&dlq, 1).await;
    let (committed_now, ends) = wait_committed_to_end(&cfg.group, &topic, 1, 2 * MINUTE).await;
    assert_eq!(
        committed_now,
        ends,
        "committed to the end once the DLQ topic exists\n{}",
        sidecar.log()
    );
    let letters = read_all(&dlq, 1);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].value.as_deref(), Some(&b"poison-1"[..]));
    assert_eq!(
        letters[0].headers.get("x-dlq-source-offset").map(String::as_str),
        Some("1")
    );
    assert!(app.delivered().iter().any(|r| r.value_str() == "fine-2"));
    let status = status_json(port).await;
    assert_eq!(status["dlq"]["healthy"], true, "{status}");
    assert_eq!(status["dlq"]["blocked_records"], 0, "{status}");
    assert_eq!(http_get(&format!("http://127.0.0.1:{port}/readyz")).await.0, 200);
    assert!(sidecar.log().contains("dead-letter writes succeed again"));
}
