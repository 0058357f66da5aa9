//! The core pipeline against the real broker, a real HTTP app and the real binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;

const MINUTE: Duration = Duration::from_secs(60);

/// 10,000 records over 3 partitions with 50 keys, values `key:seq`.
async fn produce_keyed_stream(topic: &str) -> Vec<Out> {
    let records: Vec<Out> = (0..10_000)
        .map(|i| Out::keyed(format!("k{}", i % 50), format!("k{}:{}", i % 50, i / 50)))
        .collect();
    produce(topic, records.clone()).await;
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_are_delivered_exactly_once_in_key_order() {
    require_kafka();
    let topic = unique("keyed");
    create_topic(&topic, 3).await;
    produce_keyed_stream(&topic).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let cfg = SidecarConfig::new(&topic, &app);
    let sidecar = Sidecar::start(&cfg);

    assert!(
        wait_until(2 * MINUTE, || app.delivered_count() >= 10_000).await,
        "only {} delivered",
        app.delivered_count()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, MINUTE).await;
    assert_eq!(committed, ends, "committed offsets must reach the end offsets");

    let delivered = app.delivered();
    assert_each_offset_once(&delivered, 10_000);
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    for r in &delivered {
        let v = r.value_str();
        let (key, seq) = v.split_once(':').unwrap();
        assert_eq!(
            r.key.as_deref(),
            Some(key.as_bytes()),
            "key header carries the record key"
        );
        let seq: i64 = seq.parse().unwrap();
        let prev = last_seq.insert(key.to_string(), seq);
        assert!(prev.is_none_or(|p| p < seq), "key {key}: {seq} arrived after {prev:?}");
    }
    assert_eq!(last_seq.len(), 50);
    drop(sidecar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_mode_delivers_each_partition_in_offset_order() {
    require_kafka();
    let topic = unique("ordered");
    create_topic(&topic, 3).await;
    produce_keyed_stream(&topic).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.ordering = "partition";
    let _sidecar = Sidecar::start(&cfg);

    assert!(
        wait_until(2 * MINUTE, || app.delivered_count() >= 10_000).await,
        "only {} delivered",
        app.delivered_count()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, MINUTE).await;
    assert_eq!(committed, ends);
    let delivered = app.delivered();
    assert_each_offset_once(&delivered, 10_000);
    let mut last: HashMap<i32, i64> = HashMap::new();
    for r in &delivered {
        let prev = last.insert(r.partition, r.offset);
        assert!(
            prev.is_none_or(|p| p < r.offset),
            "partition {}: offset {} after {prev:?}",
            r.partition,
            r.offset
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried_until_delivered_and_nothing_is_dead_lettered() {
    require_kafka();
    let topic = unique("flaky");
    let dlq = unique("flaky-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let records: Vec<Out> = (0..300)
        .map(|i| {
            Out::keyed(
                format!("k{}", i % 10),
                if i % 7 == 0 {
                    format!("flaky-{i}")
                } else {
                    format!("ok-{i}")
                },
            )
        })
        .collect();
    produce(&topic, records).await;
    // Flaky records get 500 on their first two attempts.
    let app = TestApp::start(|r| {
        if r.value_str().starts_with("flaky") && r.attempt <= 2 {
            Answer::status(500)
        } else {
            Answer::ok()
        }
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    let _sidecar = Sidecar::start(&cfg);

    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 300).await,
        "only {} delivered",
        app.delivered_count()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, MINUTE).await;
    assert_eq!(committed, ends);
    let delivered = app.delivered();
    assert_each_offset_once(&delivered, 300);
    let flaky: Vec<_> = delivered
        .iter()
        .filter(|r| r.value_str().starts_with("flaky"))
        .collect();
    assert_eq!(flaky.len(), 43);
    assert!(
        flaky.iter().all(|r| r.attempt == 3),
        "flaky records are delivered on their third attempt"
    );
    let failures = app.requests().iter().filter(|r| r.status == 500).count();
    assert_eq!(failures, 86, "two 500s per flaky record");
    assert_eq!(end_offsets(&dlq, 1), vec![0], "nothing is dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_go_to_the_dlq_with_metadata_and_commits_pass_them() {
    require_kafka();
    let topic = unique("poison");
    let dlq = unique("poison-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let records: Vec<Out> = (0..500)
        .map(|i| {
            let mut o = Out::keyed(
                format!("k{}", i % 20),
                if i % 25 == 0 {
                    format!("poison-{i}")
                } else {
                    format!("ok-{i}")
                },
            );
            o.headers.push(("origin".into(), format!("test-{i}")));
            o
        })
        .collect();
    produce(&topic, records).await;
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
    let _sidecar = Sidecar::start(&cfg);

    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, 2 * MINUTE).await;
    assert_eq!(committed, ends, "commits pass the dead-lettered records");
    let delivered = app.delivered();
    assert_each_offset_once(&delivered, 480);
    assert!(delivered.iter().all(|r| r.value_str().starts_with("ok")));

    let dead = read_all(&dlq, 1);
    assert_eq!(dead.len(), 20, "exactly the poison records are dead-lettered");
    let mut sources = HashSet::new();
    for d in &dead {
        let value = String::from_utf8(d.value.clone().unwrap()).unwrap();
        assert!(value.starts_with("poison-"), "{value}");
        let i: usize = value["poison-".len()..].parse().unwrap();
        assert_eq!(
            d.key.as_deref(),
            Some(format!("k{}", i % 20).as_bytes()),
            "original key kept"
        );
        assert_eq!(d.headers["origin"], format!("test-{i}"), "original headers kept");
        assert_eq!(d.headers["x-dlq-source-topic"], topic);
        assert_eq!(d.headers["x-dlq-consumer-group"], cfg.group);
        assert_eq!(d.headers["x-dlq-error-class"], "http_422");
        assert_eq!(d.headers["x-dlq-attempts"], "1");
        assert!(!d.headers["x-dlq-source-timestamp"].is_empty());
        assert!(d.headers["x-dlq-error-message"].contains("422"));
        let p: i32 = d.headers["x-dlq-source-partition"].parse().unwrap();
        let o: i64 = d.headers["x-dlq-source-offset"].parse().unwrap();
        let rejected = app
            .requests()
            .into_iter()
            .find(|r| r.id() == (p, o))
            .expect("the app saw the poison record");
        assert_eq!(rejected.status, 422);
        sources.insert((p, o));
    }
    assert_eq!(sources.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_outage_dead_letters_nothing_and_everything_arrives_after_it() {
    require_kafka();
    let topic = unique("outage");
    let dlq = unique("outage-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    produce(
        &topic,
        (0..2000)
            .map(|i| Out::keyed(format!("k{}", i % 50), format!("v{i}")))
            .collect(),
    )
    .await;
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(2),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    cfg.workers = 4;
    let _sidecar = Sidecar::start(&cfg);

    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 300).await,
        "stream did not start"
    );
    app.stop();
    let during = app.delivered_count();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(during < 2000, "the outage must happen mid-stream");
    let app = app.restart().await;

    assert!(
        wait_until(2 * MINUTE, || app
            .delivered()
            .iter()
            .map(|r| r.id())
            .collect::<HashSet<_>>()
            .len()
            >= 2000)
        .await
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, MINUTE).await;
    assert_eq!(committed, ends);
    assert_eq!(end_offsets(&dlq, 1), vec![0], "an outage dead-letters nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing() {
    require_kafka();
    let topic = unique("crash");
    create_topic(&topic, 3).await;
    produce(
        &topic,
        (0..3000)
            .map(|i| Out::keyed(format!("k{}", i % 50), format!("v{i}")))
            .collect(),
    )
    .await;
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(3),
        ..Answer::ok()
    })
    .await;
    let cfg = SidecarConfig::new(&topic, &app);
    let mut sidecar = Sidecar::start(&cfg);
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 1000).await,
        "stream did not start"
    );
    sidecar.kill9();
    assert!(app.delivered_count() < 3000, "the kill must happen mid-stream");

    let _restarted = Sidecar::start(&cfg);
    let all = || app.delivered().iter().map(|r| r.id()).collect::<HashSet<_>>().len();
    assert!(
        wait_until(2 * MINUTE, || all() >= 3000).await,
        "only {} distinct records delivered",
        all()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, MINUTE).await;
    assert_eq!(committed, ends);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_zero_and_a_restart_delivers_nothing_twice() {
    require_kafka();
    let topic = unique("term");
    create_topic(&topic, 3).await;
    produce(
        &topic,
        (0..3000)
            .map(|i| Out::keyed(format!("k{}", i % 50), format!("v{i}")))
            .collect(),
    )
    .await;
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(3),
        ..Answer::ok()
    })
    .await;
    let cfg = SidecarConfig::new(&topic, &app); // grace_period = 15s
    let mut sidecar = Sidecar::start(&cfg);
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 1000).await,
        "stream did not start"
    );

    sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sidecar
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits within the grace period");
    assert!(status.success(), "exit status {status:?}\n{}", sidecar.log());
    assert!(app.delivered_count() < 3000, "SIGTERM must come mid-stream");

    let _restarted = Sidecar::start(&cfg);
    assert!(
        wait_until(2 * MINUTE, || app.delivered_count() >= 3000).await,
        "only {} delivered",
        app.delivered_count()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, MINUTE).await;
    assert_eq!(committed, ends);
    assert_each_offset_once(&app.delivered(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_app_sees_at_most_workers_requests_and_memory_stays_bounded_over_a_big_backlog() {
    require_kafka();
    const RSS_LIMIT_MIB: u64 = 150;
    let topic = unique("backlog");
    create_topic(&topic, 3).await;
    let value = "x".repeat(1024);
    produce(
        &topic,
        (0..200_000)
            .map(|i| Out::keyed(format!("k{}", i % 1000), format!("{i}:{value}")))
            .collect(),
    )
    .await;
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(100),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.workers = 4;
    let sidecar = Sidecar::start(&cfg);

    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 20).await,
        "delivery did not start"
    );
    let mut peak = 0;
    for _ in 0..40 {
        peak = peak.max(sidecar.rss_kib());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        app.max_in_flight() <= 4,
        "the app saw {} concurrent requests",
        app.max_in_flight()
    );
    assert_eq!(app.max_in_flight(), 4, "all four workers are used");
    assert!(peak > 0);
    assert!(
        peak < RSS_LIMIT_MIB * 1024,
        "resident memory {} MiB over the {RSS_LIMIT_MIB} MiB bound with a 200 MB backlog",
        peak / 1024
    );
    let ends: i64 = end_offsets(&topic, 3).iter().sum();
    assert_eq!(ends, 200_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_delivers_in_partition_order_and_dead_letters_per_record_rejections() {
    require_kafka();
    let topic = unique("batch");
    let dlq = unique("batch-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    produce(
        &topic,
        (0..3000)
            .map(|i| {
                Out::keyed(
                    format!("k{}", i % 30),
                    if i % 100 == 0 {
                        format!("poison-{i}")
                    } else {
                        format!("v{i}")
                    },
                )
            })
            .collect(),
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
    cfg.ordering = "partition";
    cfg.dlq = Some(dlq.clone());
    cfg.mode = "batch";
    cfg.extra = "[batch]\nmax_records = 50\nlinger = \"10ms\"\n".into();
    let _sidecar = Sidecar::start(&cfg);

    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, 2 * MINUTE).await;
    assert_eq!(committed, ends);
    let delivered = app.delivered();
    assert_each_offset_once(&delivered, 2970);
    let mut last: HashMap<i32, i64> = HashMap::new();
    for r in &delivered {
        let prev = last.insert(r.partition, r.offset);
        assert!(
            prev.is_none_or(|p| p < r.offset),
            "partition {}: offset {} after {prev:?}",
            r.partition,
            r.offset
        );
    }
    assert!(
        app.max_batch() > 1 && app.max_batch() <= 50,
        "batches of 2..=50 records, saw {}",
        app.max_batch()
    );
    assert_eq!(read_all(&dlq, 1).len(), 30, "per-record 422s are dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_headers_and_tombstones_reach_the_app_losslessly() {
    use base64::Engine;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    require_kafka();
    let topic = unique("wire");
    create_topic(&topic, 1).await;
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let key = [0u8, 159, 146, 150, 255];
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "bin",
            value: Some(&[0u8, 1, 254][..]),
        })
        .insert(Header {
            key: "dup",
            value: Some("one"),
        })
        .insert(Header {
            key: "dup",
            value: Some("two"),
        })
        .insert(Header::<&[u8]> {
            key: "nil",
            value: None,
        })
        .insert(Header {
            key: "ünï",
            value: Some("çödé"),
        });
    let rec = FutureRecord::<[u8], [u8]>::to(&topic)
        .key(&key[..])
        .payload(&[1u8, 2, 0, 3][..])
        .headers(headers);
    producer.send(rec, Duration::from_secs(10)).await.unwrap();
    let tombstone = FutureRecord::<str, [u8]>::to(&topic).key("gone");
    producer.send(tombstone, Duration::from_secs(10)).await.unwrap();

    let app = TestApp::start(|_| Answer::ok()).await;
    let cfg = SidecarConfig::new(&topic, &app);
    let _sidecar = Sidecar::start(&cfg);
    assert!(wait_until(MINUTE, || app.delivered_count() == 2).await);
    let mut got = app.delivered();
    got.sort_by_key(|r| r.offset);

    let first = &got[0];
    assert_eq!(
        first.key.as_deref(),
        Some(&key[..]),
        "binary key round-trips through base64"
    );
    assert_eq!(first.value, vec![1u8, 2, 0, 3], "the body is the value byte for byte");
    assert_eq!(first.headers["x-kafka-topic"], topic.as_str());
    assert_eq!(first.headers["x-kafka-partition"], "0");
    assert_eq!(first.headers["x-kafka-offset"], "0");
    assert_eq!(first.headers["x-kafka-consumer-group"], cfg.group.as_str());
    assert!(
        first.headers["x-kafka-timestamp"]
            .to_str()
            .unwrap()
            .parse::<i64>()
            .unwrap()
            > 1_600_000_000_000
    );
    assert!(!first.headers.contains_key("x-kafka-value-null"));
    let encoded: serde_json::Value = serde_json::from_str(first.headers["x-kafka-headers"].to_str().unwrap()).unwrap();
    let b64 = |s: &str| serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(s));
    assert_eq!(
        encoded,
        serde_json::json!([
            {"name": "bin", "value": base64::engine::general_purpose::STANDARD.encode([0u8, 1, 254])},
            {"name": "dup", "value": b64("one")},
            {"name": "dup", "value": b64("two")},
            {"name": "nil", "value": null},
            {"name": "ünï", "value": b64("çödé")},
        ]),
        "headers keep order, duplicates, nulls and non-ASCII names"
    );

    let second = &got[1];
    assert_eq!(second.headers["x-kafka-value-null"], "true", "a tombstone is flagged");
    assert!(second.value.is_empty());
    assert!(!second.headers.contains_key("x-kafka-headers"));
}

/// Delivers `records` records of `topic` to `app` with a fresh group in `mode`; checks that
/// each arrived once and the commits reached the end.
async fn deliver_all_over(app: &TestApp, topic: &str, partitions: i32, records: usize, mode: &'static str) {
    let before = app.delivered_count();
    let mut cfg = SidecarConfig::new(topic, app);
    cfg.mode = mode;
    cfg.extra = "[batch]\nmax_records = 50\nlinger = \"10ms\"\n".into();
    let _sidecar = Sidecar::start(&cfg);
    assert!(
        wait_until(2 * MINUTE, || app.delivered_count() >= before + records).await,
        "{mode}: only {} of {records} delivered over {}",
        app.delivered_count() - before,
        app.url()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, topic, partitions, MINUTE).await;
    assert_eq!(committed, ends, "{mode}: committed offsets must reach the end offsets");
    assert_each_offset_once(&app.delivered()[before..], records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_an_app_on_a_unix_socket_in_single_and_batch_mode() {
    require_kafka();
    let topic = unique("uds");
    create_topic(&topic, 3).await;
    produce(
        &topic,
        (0..1500)
            .map(|i| Out::keyed(format!("k{}", i % 40), format!("v{i}")))
            .collect(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::start_unix(&dir.path().join("app.sock"), |_| Answer::ok()).await;
    assert!(app.url().starts_with("unix:///"), "{}", app.url());

    deliver_all_over(&app, &topic, 3, 1500, "single").await;
    let single = app.delivered();
    assert!(
        single
            .iter()
            .all(|r| r.headers.get("host").is_some_and(|h| h == "localhost")),
        "requests over the socket carry Host: localhost"
    );
    assert!(single.iter().all(|r| r.value_str().starts_with('v') && r.key.is_some()));

    deliver_all_over(&app, &topic, 3, 1500, "batch").await;
    assert!(app.max_batch() > 1, "batch mode sent batches over the socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_whose_unix_socket_is_gone_is_an_outage_that_dead_letters_nothing() {
    require_kafka();
    let topic = unique("uds-outage");
    let dlq = unique("uds-outage-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    produce(
        &topic,
        (0..2000)
            .map(|i| Out::keyed(format!("k{}", i % 50), format!("v{i}")))
            .collect(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("app.sock");
    let app = TestApp::start_unix(&socket, |_| Answer {
        delay: Duration::from_millis(2),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    cfg.workers = 4;
    let sidecar = Sidecar::start(&cfg);

    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 300).await,
        "stream did not start"
    );
    // The socket file is removed: connecting fails (ENOENT), like a refused TCP connection.
    app.stop();
    let during = app.delivered_count();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!socket.exists(), "the socket is gone during the outage");
    // A socket file that nobody listens on: connections are refused (ECONNREFUSED).
    let stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(stale);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(during < 2000, "the outage must happen mid-stream");
    let log = sidecar.log();
    assert!(
        log.contains("app unreachable"),
        "the outage is logged as the app being unreachable:\n{log}"
    );
    let app = app.restart().await;

    assert!(
        wait_until(2 * MINUTE, || app
            .delivered()
            .iter()
            .map(|r| r.id())
            .collect::<HashSet<_>>()
            .len()
            >= 2000)
        .await
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, MINUTE).await;
    assert_eq!(committed, ends);
    assert_eq!(end_offsets(&dlq, 1), vec![0], "an outage dead-letters nothing");
}
