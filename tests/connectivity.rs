//! Broker connectivity: an outage of the Kafka cluster is visible in `/status`, the metrics and
//! one log line per change, and the sidecar recovers by itself when the brokers come back.
//! Runs against a broker the test owns (common::kafka_server), so it can stop it.

mod common;

use std::time::{Duration, Instant};

use common::kafka_server::TestKafka;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_broker_keeps_its_topics_and_offsets_across_a_restart() {
    let mut kafka = TestKafka::start();
    let topic = unique("kafka-server");
    create_topic_on(&kafka.bootstrap(), &topic, 2).await;
    produce_to(
        &kafka.bootstrap(),
        &topic,
        (0..10).map(|i| Out::keyed(format!("k{i}"), "v")).collect(),
    )
    .await;
    let before = end_offsets_on(&kafka.bootstrap(), &topic, 2);
    assert_eq!(before.iter().sum::<i64>(), 10);

    kafka.stop();
    assert!(!kafka.is_running());
    assert!(!kafka.answers(), "a Kafka broker still answers on the port after stop");
    kafka.restart();
    assert_eq!(
        end_offsets_on(&kafka.bootstrap(), &topic, 2),
        before,
        "data lost across the restart"
    );
    produce_to(&kafka.bootstrap(), &topic, vec![Out::keyed("k", "after")]).await;
    let after = end_offsets_on(&kafka.bootstrap(), &topic, 2);
    assert_eq!(after.iter().sum::<i64>(), 11, "cannot produce after the restart");
}

/// `/status`'s `"kafka"` object (Null when the admin port does not answer).
async fn kafka_status(admin: u16) -> serde_json::Value {
    let (_, body) = http_get(&format!("http://127.0.0.1:{admin}/status")).await;
    serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()["kafka"].clone()
}

async fn connected_metric(admin: u16) -> Option<f64> {
    let (_, text) = http_get(&format!("http://127.0.0.1:{admin}/metrics")).await;
    metric(&text, "kafka_sidecar_kafka_connected", &[])
}

/// Waits until `/status` and the metric both say `connected`; returns the last `"kafka"` seen.
async fn wait_connected(admin: u16, connected: bool, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let kafka = kafka_status(admin).await;
        let gauge = connected_metric(admin).await;
        if kafka["connected"] == connected && gauge == Some(f64::from(u8::from(connected))) {
            return kafka;
        }
        assert!(
            Instant::now() < deadline,
            "kafka.connected never became {connected}: /status {kafka}, kafka_sidecar_kafka_connected {gauge:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn records(from: usize, to: usize) -> Vec<Out> {
    (from..to)
        .map(|i| Out::keyed(format!("k{}", i % 50), format!("v{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_reported_once_and_consumption_recovers_without_a_restart() {
    let mut kafka = TestKafka::start();
    let bootstrap = kafka.bootstrap();
    let topic = unique("outage");
    create_topic_on(&bootstrap, &topic, 3).await;
    produce_to(&bootstrap, &topic, records(0, 2_000)).await;

    // A slowish app, so the outage begins with records read and in flight.
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(5),
        ..Answer::ok()
    })
    .await;
    let admin = free_port();
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.admin_port = Some(admin);
    let toml = cfg.toml().replace(&brokers(), &bootstrap);
    let sidecar = Sidecar::start_toml(&toml);

    let before = wait_connected(admin, true, Duration::from_secs(60)).await;
    assert!(before["error"].is_null(), "no error while connected: {before}");
    assert!(
        wait_until(Duration::from_secs(60), || app.delivered_count() >= 300).await,
        "the sidecar did not start delivering"
    );

    kafka.stop();
    let stopped = Instant::now();
    let log_before = sidecar.log().lines().count();
    let down = wait_connected(admin, false, Duration::from_secs(15)).await;
    assert!(
        down["error"].as_str().is_some_and(|e| !e.is_empty()),
        "/status says why: {down}"
    );
    assert!(down["since"].is_string(), "/status says since when: {down}");
    eprintln!("during the outage, /status kafka = {down}");
    let delivered_at_outage = app.delivered_count();
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(stopped.elapsed())).await;
    let still = kafka_status(admin).await;
    assert_eq!(still["connected"], false, "{still}");
    assert_eq!(still["since"], down["since"], "one outage is one state change: {still}");
    let (ready, _) = http_get(&format!("http://127.0.0.1:{admin}/readyz")).await;
    assert_eq!(
        ready, 200,
        "a broker outage does not take the pod (and its app) out of its Service"
    );
    let outage_log: Vec<String> = sidecar.log().lines().skip(log_before).map(str::to_string).collect();

    let delivered_in_outage = app.delivered_count() - delivered_at_outage;
    kafka.restart();
    wait_connected(admin, true, Duration::from_secs(60)).await;
    produce_to(&bootstrap, &topic, records(2_000, 2_500)).await;
    let (committed, ends) = wait_committed_to_end_on(&bootstrap, &cfg.group, &topic, 3, Duration::from_secs(120)).await;
    assert_eq!(
        committed, ends,
        "committed offsets never reached the end after the outage"
    );
    assert_eq!(ends.iter().sum::<i64>(), 2_500);

    let delivered = app.delivered();
    let distinct: std::collections::HashSet<_> = delivered.iter().map(|r| r.id()).collect();
    assert_eq!(distinct.len(), 2_500, "every record was delivered");
    // Records read before the outage are still delivered during it but cannot be committed:
    // they are delivered again once the group takes the partitions back (at-least-once).
    eprintln!(
        "delivered {} requests for 2,500 records: {} before the outage, {} during it, {} again after it",
        delivered.len(),
        delivered_at_outage,
        delivered_in_outage,
        delivered.len() - distinct.len()
    );

    let log = sidecar.log();
    let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        count("cannot reach the Kafka brokers"),
        1,
        "the outage is logged once:\n{log}"
    );
    assert_eq!(
        count("connected to the Kafka brokers again"),
        1,
        "the recovery is logged once:\n{log}"
    );
    let noisy: Vec<&String> = outage_log
        .iter()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
        .collect();
    eprintln!("{} warning/error lines during the outage:", noisy.len());
    for line in &noisy {
        eprintln!("  {line}");
    }
    assert!(
        noisy.len() <= 5,
        "{} warnings/errors logged during a 15 s outage (one state change expected):\n{}",
        noisy.len(),
        noisy.iter().map(|l| l.as_str()).collect::<Vec<_>>().join("\n")
    );
}
