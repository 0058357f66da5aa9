//! Retry tiers on the real broker: a failing record leaves its lane for delayed tier topics,
//! is delivered again from them after their delays, and goes to the DLQ after the last one
//! carrying its whole history; nothing is lost across a SIGKILL; hostile retry headers
//! written into a tier topic never crash the sidecar.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Topics of one test: a source, the tiers, the DLQ (all created, one partition each).
struct Topics {
    source: String,
    tiers: Vec<String>,
    dlq: String,
}

async fn topics(name: &str, tiers: usize) -> Topics {
    require_kafka();
    let t = Topics {
        source: unique(name),
        tiers: (1..=tiers).map(|i| unique(&format!("{name}-retry{i}"))).collect(),
        dlq: unique(&format!("{name}-dlq")),
    };
    create_topic(&t.source, 1).await;
    for tier in &t.tiers {
        create_topic(tier, 1).await;
    }
    create_topic(&t.dlq, 1).await;
    t
}

/// The sidecar config with `[retry_topics]` on: these tiers and delays.
fn config(t: &Topics, app: &TestApp, delays: &[&str], in_place: u32, ordering: &'static str) -> SidecarConfig {
    let mut cfg = SidecarConfig::new(&t.source, app);
    cfg.dlq = Some(t.dlq.clone());
    cfg.ordering = ordering;
    cfg.admin_port = Some(free_port());
    let tiers: Vec<String> = t
        .tiers
        .iter()
        .zip(delays)
        .map(|(topic, delay)| format!("{{ topic = \"{topic}\", delay = \"{delay}\" }}"))
        .collect();
    cfg.extra = format!(
        "\n[retry_topics]\nenabled = true\nin_place_attempts = {in_place}\ntiers = [{}]\n",
        tiers.join(", ")
    );
    cfg
}

/// The trace the failing record of the history test belongs to.
const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";

fn header<'r>(r: &'r Request, name: &str) -> &'r str {
    r.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

async fn metrics(cfg: &SidecarConfig) -> String {
    http_get(&format!("http://127.0.0.1:{}/metrics", cfg.admin_port.unwrap()))
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_failing_three_times_reaches_the_app_from_tier_two_after_the_delays_while_its_partition_flows_on() {
    let t = topics("rt-flow", 2).await;
    // The record "flaky" fails its first 3 attempts; everything else succeeds at once.
    let flaky_tries = Arc::new(AtomicUsize::new(0));
    let tries = flaky_tries.clone();
    let app = TestApp::start(move |r| {
        if r.value_str() == "flaky" && tries.fetch_add(1, Ordering::SeqCst) < 3 {
            Answer::status(500)
        } else {
            Answer::ok()
        }
    })
    .await;
    // Partition ordering: retried in place, "flaky" would hold up the whole partition.
    let cfg = config(&t, &app, &["2s", "4s"], 2, "partition");
    let _sidecar = Sidecar::start(&cfg);
    let mut records = vec![Out::keyed("k", "flaky")];
    records.extend((0..1000).map(|i| Out::keyed(format!("k{i}"), format!("v{i}"))));
    produce(&t.source, records).await;

    let done = wait_until(Duration::from_secs(90), || {
        app.delivered().iter().any(|r| r.value_str() == "flaky") && app.delivered_count() >= 1001
    })
    .await;
    assert!(done, "not everything delivered: {} delivered", app.delivered_count());
    let requests = app.requests();
    let flaky: Vec<&Request> = requests.iter().filter(|r| r.value_str() == "flaky").collect();
    assert_eq!(flaky.len(), 4, "two in place, one from each tier: {flaky:#?}");
    let attempts: Vec<u32> = flaky.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [1, 2, 3, 4], "X-Kafka-Attempt continues across the tiers");
    assert_eq!(flaky[0].topic, t.source);
    assert_eq!(flaky[1].topic, t.source);
    assert_eq!(flaky[2].topic, t.tiers[0]);
    assert_eq!(flaky[3].topic, t.tiers[1]);
    assert_eq!(flaky[3].status, 200, "reached the app from tier 2");
    for (r, tier) in [(flaky[2], "1"), (flaky[3], "2")] {
        assert_eq!(header(r, "x-kafka-retry-tier"), tier);
        assert_eq!(header(r, "x-kafka-original-topic"), t.source);
        assert_eq!(header(r, "x-kafka-original-partition"), "0");
        assert_eq!(header(r, "x-kafka-original-offset"), "0");
        assert_eq!(r.key.as_deref(), Some(&b"k"[..]), "the original key");
    }
    assert!(header(flaky[0], "x-kafka-retry-tier").is_empty());
    // The delays, with a tolerance for the poll loop (100 ms) and clock granularity.
    let tier1_wait = flaky[2].at - flaky[1].at;
    let tier2_wait = flaky[3].at - flaky[2].at;
    assert!(
        tier1_wait >= Duration::from_millis(1800),
        "tier 1 waited {tier1_wait:?}"
    );
    assert!(
        tier2_wait >= Duration::from_millis(3800),
        "tier 2 waited {tier2_wait:?}"
    );
    assert!(
        tier1_wait + tier2_wait < Duration::from_secs(40),
        "{tier1_wait:?} + {tier2_wait:?}"
    );
    // The partition did not wait for it: the next record went out before the tier-1 attempt,
    // and the 1,000 others all before the tier-2 one.
    let others: Vec<&Request> = requests.iter().filter(|r| r.value_str() != "flaky").collect();
    assert_each_offset_once(&others.iter().map(|r| (*r).clone()).collect::<Vec<_>>(), 1000);
    let next = others.iter().find(|r| r.offset == 1).expect("offset 1 delivered");
    assert!(next.at < flaky[2].at, "offset 1 waited for the retry tier");
    let last_other = others.iter().map(|r| r.at).max().unwrap();
    assert!(
        last_other < flaky[3].at,
        "the partition's other records waited for the record in tier 2"
    );
    assert_committed_to_end(&cfg.group, &t.source, 1).await;
    assert_committed_to_end(&cfg.group, &t.tiers[0], 1).await;
    assert_committed_to_end(&cfg.group, &t.tiers[1], 1).await;
    assert!(read_all(&t.dlq, 1).is_empty(), "nothing dead-lettered");
    let text = metrics(&cfg).await;
    let m = |name, tier: &str| metric(&text, name, &[("tier", tier)]);
    assert_eq!(
        m("kafka_sidecar_retry_tier_sent_total", &t.tiers[0]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(m("kafka_sidecar_retry_tier_sent_total", &t.tiers[1]), Some(1.0));
    assert_eq!(m("kafka_sidecar_retry_tier_delivered_total", &t.tiers[0]), Some(0.0));
    assert_eq!(m("kafka_sidecar_retry_tier_delivered_total", &t.tiers[1]), Some(1.0));
    assert!(m("kafka_sidecar_retry_tier_lag_seconds", &t.tiers[1]).is_some());
    assert!(m("kafka_sidecar_retry_tier_lag_records", &t.tiers[1]).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkill_while_records_sit_in_a_tier_loses_nothing() {
    let t = topics("rt-kill", 1).await;
    // Each record fails its first attempt, then succeeds.
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let s = seen.clone();
    let app = TestApp::start(move |r| {
        let mut seen = s.lock().unwrap();
        let n = seen.entry(r.value_str()).or_default();
        *n += 1;
        if *n == 1 {
            Answer::status(500)
        } else {
            Answer::ok()
        }
    })
    .await;
    // Fewer records than breaker.min_requests: every first attempt failing must not open the
    // breaker (an open breaker keeps records in place, as for an outage).
    const N: usize = 15;
    let cfg = config(&t, &app, &["6s"], 1, "key");
    let mut sidecar = Sidecar::start(&cfg);
    produce(
        &t.source,
        (0..N).map(|i| Out::keyed(format!("k{i}"), format!("v{i}"))).collect(),
    )
    .await;
    // All in the tier, the source committed past them, none delivered yet.
    let moved = wait_until(Duration::from_secs(60), || {
        end_offsets(&t.tiers[0], 1) == vec![N as i64] && committed(&cfg.group, &t.source, 1) == vec![N as i64]
    })
    .await;
    assert!(
        moved,
        "records never moved to the tier: tier end {:?}",
        end_offsets(&t.tiers[0], 1)
    );
    assert_eq!(app.delivered_count(), 0, "delivered before the tier's delay");
    sidecar.kill9();

    let _restarted = Sidecar::start(&cfg);
    let all = wait_until(Duration::from_secs(90), || app.delivered_count() >= N).await;
    let delivered = app.delivered();
    assert!(all, "only {} of {N} delivered after the restart", delivered.len());
    let mut originals: Vec<String> = delivered
        .iter()
        .map(|r| header(r, "x-kafka-original-offset").to_string())
        .collect();
    originals.sort_by_key(|o| o.parse::<i64>().unwrap_or(-1));
    originals.dedup();
    assert_eq!(originals.len(), N, "every original offset delivered: {originals:?}");
    assert!(delivered.iter().all(|r| r.topic == t.tiers[0] && r.attempt == 2));
    assert_committed_to_end(&cfg.group, &t.tiers[0], 1).await;
    assert!(read_all(&t.dlq, 1).is_empty(), "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_last_tier_the_dead_letter_carries_the_full_history_and_poison_skips_the_tiers() {
    let t = topics("rt-history", 2).await;
    let app = TestApp::start(|r| match r.value_str().as_str() {
        "poison" => Answer::status(422),
        _ => Answer::status(500),
    })
    .await;
    let cfg = config(&t, &app, &["1s", "2s"], 2, "key");
    let _sidecar = Sidecar::start(&cfg);
    let mut failing = Out::keyed("order-1", "always-500");
    failing.headers = vec![
        ("origin".into(), "test".into()),
        ("traceparent".into(), format!("00-{TRACE_ID}-b7ad6b7169203331-01")),
    ];
    produce(&t.source, vec![failing, Out::keyed("order-2", "poison")]).await;

    let both = wait_until(Duration::from_secs(60), || end_offsets(&t.dlq, 1) == vec![2]).await;
    assert!(both, "dead letters: {:?}", end_offsets(&t.dlq, 1));
    let dead = read_all(&t.dlq, 1);
    let h = |r: &Read, name: &str| r.headers.get(name).cloned().unwrap_or_default();
    let poison = dead
        .iter()
        .find(|r| r.value.as_deref() == Some(&b"poison"[..]))
        .unwrap();
    assert_eq!(h(poison, "x-dlq-error-class"), "http_422");
    assert_eq!(h(poison, "x-dlq-attempts"), "1", "poison is not retried");
    assert_eq!(h(poison, "x-dlq-source-offset"), "1");
    assert!(h(poison, "x-retry-tier").is_empty(), "poison never went to a tier");

    let letter = dead
        .iter()
        .find(|r| r.value.as_deref() == Some(&b"always-500"[..]))
        .unwrap();
    assert_eq!(letter.key.as_deref(), Some(&b"order-1"[..]));
    assert_eq!(h(letter, "origin"), "test", "the original headers are kept");
    assert_eq!(h(letter, "x-dlq-source-topic"), t.source, "the original coordinates");
    assert_eq!(h(letter, "x-dlq-source-partition"), "0");
    assert_eq!(h(letter, "x-dlq-source-offset"), "0");
    assert_eq!(h(letter, "x-dlq-attempts"), "4", "2 in place + 1 per tier");
    assert_eq!(h(letter, "x-dlq-error-class"), "http_500");
    assert!(h(letter, "x-dlq-error-message").contains("gave up after 4 attempts"));
    assert_eq!(h(letter, "x-retry-tier"), "2");
    assert_eq!(h(letter, "x-retry-attempts"), "3");
    assert_eq!(h(letter, "x-retry-source-topic"), t.source);
    assert_eq!(h(letter, "x-retry-first-error-class"), "http_500");
    assert_eq!(h(letter, "x-retry-first-error-status"), "500");
    assert_eq!(h(letter, "x-retry-last-error-status"), "500");
    let history = h(letter, "x-retry-history");
    let entries: Vec<&str> = history.split(',').collect();
    assert_eq!(entries.len(), 2, "one entry per tier: {history}");
    assert!(
        entries[0].starts_with("1:2:http_500:") && entries[1].starts_with("2:3:http_500:"),
        "{history}"
    );
    assert!(
        h(letter, "traceparent").starts_with(&format!("00-{TRACE_ID}-")),
        "the trace context travels: {:?}",
        h(letter, "traceparent")
    );
    // The tiers each got the record once; every offset is committed.
    assert_eq!(end_offsets(&t.tiers[0], 1), vec![1]);
    assert_eq!(end_offsets(&t.tiers[1], 1), vec![1]);
    let requests = app.requests();
    assert_eq!(requests.iter().filter(|r| r.value_str() == "always-500").count(), 4);
    assert_eq!(requests.iter().filter(|r| r.value_str() == "poison").count(), 1);
    assert_committed_to_end(&cfg.group, &t.source, 1).await;
    assert_committed_to_end(&cfg.group, &t.tiers[1], 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_app_never_moves_records_to_a_tier() {
    let t = topics("rt-outage", 1).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    app.stop();
    let cfg = config(&t, &app, &["1s"], 1, "key");
    let _sidecar = Sidecar::start(&cfg);
    produce(&t.source, (0..5).map(|i| Out::keyed(format!("k{i}"), "v")).collect()).await;
    // Refused connections for a while: records wait, the tier stays empty.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        end_offsets(&t.tiers[0], 1),
        vec![0],
        "an outage moved records to the tier"
    );
    let app = app.restart().await;
    let all = wait_until(Duration::from_secs(60), || app.delivered_count() >= 5).await;
    assert!(all, "{} delivered", app.delivered_count());
    assert!(app.delivered().iter().all(|r| r.topic == t.source));
    assert_eq!(end_offsets(&t.tiers[0], 1), vec![0]);
    assert!(read_all(&t.dlq, 1).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_retry_headers_on_a_tier_record_never_panic_and_are_delivered_or_dead_lettered_with_a_reason() {
    let t = topics("rt-hostile", 1).await;
    let app = TestApp::start(|r| match r.value_str().as_str() {
        "reject" => Answer::status(500),
        _ => Answer::ok(),
    })
    .await;
    let cfg = config(&t, &app, &["1s"], 1, "key");
    let _sidecar = Sidecar::start(&cfg);
    let garbage: Vec<Vec<RawHeader>> = vec![
        // Far-future not-before, absurd numbers, bytes that are not UTF-8.
        vec![
            (b"x-retry-not-before".to_vec(), Some(b"99999999999999999".to_vec())),
            (b"x-retry-attempts".to_vec(), Some(b"4294967296".to_vec())),
            (b"x-retry-source-partition".to_vec(), Some(b"\xff\xfe".to_vec())),
            (b"x-retry-source-topic".to_vec(), Some(vec![0xc3; 3000])),
        ],
        vec![
            (b"x-retry-not-before".to_vec(), Some(b"-9223372036854775808".to_vec())),
            (b"x-retry-attempts".to_vec(), Some(b"-1".to_vec())),
            (b"x-retry-history".to_vec(), Some("é".repeat(1000).into_bytes())),
            (b"x-retry-source-topic".to_vec(), Some(b"".to_vec())),
            (b"x-retry-source-offset".to_vec(), None),
            (b"\xff\x00x-retry-tier".to_vec(), Some(b"\x00".to_vec())),
        ],
        // No retry headers at all.
        vec![],
        vec![(b"x-retry-not-before".to_vec(), Some(b"NaN".to_vec()))],
    ];
    let mut records: Vec<RawOut> = garbage
        .into_iter()
        .enumerate()
        .map(|(i, headers)| RawOut {
            key: Some(format!("h{i}").into_bytes()),
            value: Some(format!("hostile-{i}").into_bytes()),
            headers,
        })
        .collect();
    records.push(RawOut {
        key: None,
        value: Some(b"reject".to_vec()),
        headers: vec![(b"x-retry-first-error-class".to_vec(), Some(vec![0xff; 3000]))],
    });
    for result in produce_raw(&t.tiers[0], records).await {
        result.expect("written to the tier");
    }
    let done = wait_until(Duration::from_secs(60), || {
        app.delivered_count() >= 4 && end_offsets(&t.dlq, 1) == vec![1]
    })
    .await;
    assert!(
        done,
        "{} delivered, DLQ {:?}",
        app.delivered_count(),
        end_offsets(&t.dlq, 1)
    );
    let delivered = app.delivered();
    for i in 0..4 {
        let r = delivered
            .iter()
            .find(|r| r.value_str() == format!("hostile-{i}"))
            .unwrap_or_else(|| panic!("hostile-{i} not delivered"));
        assert_eq!(r.topic, t.tiers[0]);
        assert_eq!(header(r, "x-kafka-retry-tier"), "1");
        assert!(r.attempt >= 2, "attempt {} of hostile-{i}", r.attempt);
    }
    let dead = read_all(&t.dlq, 1);
    let h = |name: &str| dead[0].headers.get(name).cloned().unwrap_or_default();
    assert_eq!(dead[0].value.as_deref(), Some(&b"reject"[..]));
    assert_eq!(h("x-dlq-error-class"), "http_500", "dead-lettered with a reason");
    // Without original coordinates, the tier record's own are named.
    assert_eq!(h("x-dlq-source-topic"), t.tiers[0]);
    assert_eq!(h("x-dlq-source-offset"), "4");
    assert_committed_to_end(&cfg.group, &t.tiers[0], 1).await;
    let status = http_get(&format!("http://127.0.0.1:{}/healthz", cfg.admin_port.unwrap())).await;
    assert_eq!(status.0, 200, "the sidecar is alive");
}
