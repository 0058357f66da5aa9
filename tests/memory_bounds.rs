//! Memory under a stream of distinct keys: the per-key rate limiter and the dedup gate (with
//! the embedded store) driven with 1,000,000 distinct record keys and idempotency keys, as the
//! workers drive them, watching their map sizes and this process's resident memory.
//!
//! Virtual time (tokio's paused clock): the per-key rate is 1 record/s, so without a count
//! bound every key's state would stay in memory; waits take no real time.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kafka_sidecar::dedup::{Decision, Dedup, DedupConfig, Gate, OnError};
use kafka_sidecar::metrics::Metrics;
use kafka_sidecar::ratelimit::{RateLimitConfig, RateLimiter};
use kafka_sidecar::record::Record;

const KEYS: usize = 1_000_000;
/// Records in flight at once (the pipeline's in-flight bound).
const IN_FLIGHT: usize = 500;
const MAX_KEYS: usize = 10_000;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// A record whose key is 100 bytes, distinct for every offset.
fn record(offset: usize) -> Record {
    Record {
        topic: Arc::from("orders"),
        partition: 0,
        offset: offset as i64,
        timestamp_ms: Some(1_700_000_000_000),
        key: Some(Bytes::from(format!("{offset:0>100}"))),
        value: Some(Bytes::from_static(b"v")),
        headers: Vec::new(),
        generation: 0,
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_million_distinct_keys_keep_limiter_and_dedup_gate_bounded_by_count() {
    let started = Instant::now();
    let limiter = RateLimiter::new(
        &RateLimitConfig {
            per_key_records_per_second: 1.0,
            per_key_burst: 1,
            per_key_max_keys: MAX_KEYS,
            ..RateLimitConfig::default()
        },
        8,
    );
    let store = Dedup::connect_lazy(&DedupConfig::default(), "memory-test")
        .await
        .expect("embedded dedup store");
    let gate = Gate::new(store, OnError::Pause, Arc::new(Metrics::new()));
    let (mut max_tracked, mut max_held) = (0, 0);
    let mut baseline = None;
    let mut peak = 0;
    for wave in 0..KEYS / IN_FLIGHT {
        let records: Vec<Record> = (0..IN_FLIGHT).map(|i| record(wave * IN_FLIGHT + i)).collect();
        let keys: Vec<String> = records.iter().map(|r| format!("id-{:0>100}", r.offset)).collect();
        let items: Vec<(&Record, &str)> = records.iter().zip(&keys).map(|(r, k)| (r, k.as_str())).collect();
        let decisions = gate.claim(&items).await.expect("claim");
        assert!(
            decisions.iter().all(|d| *d == Decision::Deliver),
            "distinct keys are all new"
        );
        max_held = max_held.max(gate.held_keys());
        for r in &records {
            let _permit = limiter.acquire(r.key.as_deref(), 1).await;
        }
        max_tracked = max_tracked.max(limiter.tracked_keys());
        gate.done(&items).await.expect("done");
        // Measured once the limiter table and the embedded store (100,000 keys) are full.
        if wave * IN_FLIGHT == 200_000 {
            baseline = Some(rss_kib());
        }
        if wave % 100 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    let end = rss_kib();
    let baseline = baseline.expect("baseline taken");
    let growth = end.saturating_sub(baseline);
    eprintln!(
        "{KEYS} distinct keys in {:.1} s: RSS {baseline} KiB after 200,000 keys, {end} KiB at the end \
         (peak {peak} KiB); at most {max_tracked} per-key states and {max_held} held dedup keys",
        started.elapsed().as_secs_f64()
    );
    assert!(
        max_tracked <= MAX_KEYS,
        "per-key states exceeded the bound: {max_tracked}"
    );
    assert!(
        max_held <= IN_FLIGHT,
        "the gate held more keys than records in flight: {max_held}"
    );
    assert_eq!(gate.held_keys(), 0, "every key is forgotten once its record is done");
    assert!(
        growth < 16 * 1024,
        "resident memory grew {growth} KiB over the last 800,000 distinct keys ({baseline} -> {end} KiB)"
    );
    assert!(end < 200 * 1024, "resident memory {end} KiB");
}
