//! Lag is true from the first second: `kafka_sidecar_consumer_lag_records` and `/status` show
//! each partition's real backlog — for partitions never read (paused before their first
//! record) and for partitions whose committed offsets come from an earlier run.

mod common;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// Produces `count` records into one partition.
async fn fill(topic: &str, partition: i32, count: usize) {
    let records = (0..count)
        .map(|i| Out {
            partition: Some(partition),
            ..Out::keyed(format!("k{partition}-{i}"), format!("v{i}"))
        })
        .collect();
    produce(topic, records).await;
}

/// Lag per partition from `/metrics` (None where the sample is missing).
async fn metric_lags(port: u16, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    let (_, text) = http_get(&format!("http://127.0.0.1:{port}/metrics")).await;
    (0..partitions)
        .map(|p| {
            metric(
                &text,
                "kafka_sidecar_consumer_lag_records",
                &[("topic", topic), ("partition", &p.to_string())],
            )
            .map(|v| v as i64)
        })
        .collect()
}

/// `/status` partitions of `topic`, ordered by partition.
async fn status_partitions(port: u16, topic: &str) -> Vec<serde_json::Value> {
    let (_, body) = http_get(&format!("http://127.0.0.1:{port}/status")).await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut parts: Vec<_> = status["partitions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["topic"] == topic)
        .collect();
    parts.sort_by_key(|p| p["partition"].as_i64());
    parts
}

fn field(parts: &[serde_json::Value], name: &str) -> Vec<Option<i64>> {
    parts.iter().map(|p| p[name].as_i64()).collect()
}

/// Waits until both the metric and `/status` show `want` as the lag of every partition, then
/// returns the `/status` partitions; fails showing what was last seen.
async fn assert_lag(port: u16, topic: &str, want: &[i64]) -> Vec<serde_json::Value> {
    let want: Vec<Option<i64>> = want.iter().map(|l| Some(*l)).collect();
    let n = want.len() as i32;
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut metrics, mut status) = (vec![], vec![]);
    while Instant::now() < deadline {
        metrics = metric_lags(port, topic, n).await;
        status = status_partitions(port, topic).await;
        if metrics == want && field(&status, "lag") == want {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "lag never matched the backlog {want:?}: metric {metrics:?}, /status {:?} (full: {status:?})",
        field(&status, "lag")
    );
}

fn config(topic: &str, app: &TestApp, admin: u16) -> SidecarConfig {
    let mut cfg = SidecarConfig::new(topic, app);
    cfg.admin_port = Some(admin);
    cfg.ordering = "partition";
    cfg
}

/// The sidecar's config with room for only a few records in flight: once they are read (and
/// refused by the app) the sidecar holds and pauses, so some partitions are never read at all.
fn toml_with_little_room(cfg: &SidecarConfig) -> String {
    let toml = cfg.toml();
    assert!(toml.contains("[pipeline]\n"));
    toml.replace("[pipeline]\n", "[pipeline]\nmax_in_flight_records = 5\n")
}

/// Partitions the sidecar never read a record of (`position` is null in `/status`).
fn unread(status: &[serde_json::Value]) -> usize {
    status.iter().filter(|p| p["position"].is_null()).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_group_shows_every_partitions_whole_backlog_while_the_app_refuses_records() {
    require_kafka();
    let topic = unique("lag-fresh");
    create_topic(&topic, 3).await;
    let backlog: [i64; 3] = [780, 960, 1260];
    let produced_from = std::time::SystemTime::now();
    for (p, n) in backlog.iter().enumerate() {
        fill(&topic, p as i32, *n as usize).await;
    }
    let produced_to = std::time::SystemTime::now();
    // The app is down from the start: the breaker pauses everything before most partitions
    // were read, and nothing is ever committed.
    let app = TestApp::start(|_| Answer::status(503)).await;
    let admin = free_port();
    let _sidecar = Sidecar::start_toml(&toml_with_little_room(&config(&topic, &app, admin)));

    let status = assert_lag(admin, &topic, &backlog).await;
    // A partition being read may have committed its first offset (0: nothing done yet).
    let committed = field(&status, "committed");
    assert!(
        committed.iter().all(|c| c.unwrap_or(0) == 0),
        "nothing past the first record was committed: {committed:?}"
    );
    assert!(
        unread(&status) >= 1,
        "the case under test: some partition was never read ({status:?})"
    );

    // Lag in seconds: the age of the first unfinished record of each partition, read or not.
    let since = |t: std::time::SystemTime| t.elapsed().unwrap_or_default().as_secs_f64();
    let (oldest, newest) = (since(produced_from) + 1.0, since(produced_to) - 1.0);
    for part in &status {
        let age = part["lag_seconds"].as_f64().unwrap_or(-1.0);
        assert!(
            age >= newest && age <= oldest,
            "partition {}: lag_seconds {age} is not the age of its first record (between {newest:.1} and {oldest:.1})",
            part["partition"]
        );
    }
    assert_eq!(
        app.delivered_count(),
        0,
        "the app accepted nothing, so the backlog is intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_lag_counts_from_the_offsets_committed_by_the_previous_run() {
    require_kafka();
    let topic = unique("lag-restart");
    create_topic(&topic, 3).await;
    for p in 0..3 {
        fill(&topic, p, 300).await;
    }
    let status_code = Arc::new(AtomicU16::new(200));
    let code = status_code.clone();
    let app = TestApp::start(move |_| Answer::status(code.load(Ordering::SeqCst))).await;
    let admin = free_port();
    let cfg = config(&topic, &app, admin);

    let mut first = Sidecar::start(&cfg);
    assert_committed_to_end(&cfg.group, &topic, 3).await;
    first.signal(nix::sys::signal::Signal::SIGTERM);
    let exit = first.wait_exit(Duration::from_secs(30)).await;
    assert!(
        exit.is_some_and(|s| s.success()),
        "first run did not exit cleanly: {exit:?}"
    );
    drop(first);

    // 480 more per partition while no member runs, and the app refuses everything from now on.
    for p in 0..3 {
        fill(&topic, p, 480).await;
    }
    status_code.store(503, Ordering::SeqCst);
    let _second = Sidecar::start_toml(&toml_with_little_room(&cfg));

    let status = assert_lag(admin, &topic, &[480, 480, 480]).await;
    assert!(
        unread(&status) >= 1,
        "the case under test: some partition was not read since the restart ({status:?})"
    );
    assert_eq!(
        field(&status, "committed"),
        vec![Some(300); 3],
        "/status shows the offsets committed by the first run"
    );
    assert_eq!(
        committed(&cfg.group, &topic, 3),
        vec![300; 3],
        "nothing more was committed"
    );
}
