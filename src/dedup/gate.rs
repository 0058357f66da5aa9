//! The worker's side of dedup: claim before delivery, mark done after, release on give-up.
//!
//! The store's leases belong to the process, so two records of this process sharing an
//! idempotency key (say two lanes, or two records in one batch) would both see `Claimed`.
//! The gate therefore remembers which record of this process holds each key: a second
//! record with the same key waits until the first is done (then it is a duplicate) or
//! released (then it claims the key itself). Every store call is timed and its errors are
//! counted for the metrics.
//!
//! Bounded by count: a key is in the map only from its record's claim until that record is
//! marked done, released (failed, revoked) or found a duplicate, and each record holds at
//! most one key, so the map never holds more keys than records in flight
//! (`pipeline.max_in_flight_records`), however many distinct keys stream through.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::time::Instant;

use super::{Claim, Dedup, DedupError, OnError};
use crate::metrics::{DedupLabels, Metrics};
use crate::record::Record;

/// What to do with a record after its claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The key is ours: deliver.
    Deliver,
    /// The key is done: finish the record without delivering it.
    Duplicate,
    /// Another record (here or in another consumer) holds the key: try again later.
    Wait,
}

/// A record's identity, to tell which record of this process holds a key.
type RecordId = (Arc<str>, i32, i64);

fn id(r: &Record) -> RecordId {
    (r.topic.clone(), r.partition, r.offset)
}

type Held = HashMap<String, RecordId, foldhash::fast::RandomState>;

/// Dedup around deliveries; shared by all workers.
pub struct Gate {
    store: Dedup,
    on_error: OnError,
    metrics: Arc<Metrics>,
    /// Keys a record of this process has claimed and not yet marked done or released (at
    /// most the records in flight). Hashed with foldhash, seeded per process like the
    /// scheduler's lanes: looked up twice per record.
    held: Mutex<Held>,
}

impl Gate {
    pub fn new(store: Dedup, on_error: OnError, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            on_error,
            metrics,
            held: Mutex::new(Held::default()),
        }
    }

    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// Keys held by records of this process right now (at most the records in flight).
    pub fn held_keys(&self) -> usize {
        self.lock().len()
    }

    /// Where the keys live (for logs).
    pub fn target(&self) -> &str {
        self.store.target()
    }

    /// Claims the key of each `(record, idempotency key)`, in one round trip. Claiming a key
    /// the record already holds refreshes its lease (a retried record keeps it).
    pub async fn claim(&self, items: &[(&Record, &str)]) -> Result<Vec<Decision>, DedupError> {
        let mut decisions = vec![Decision::Wait; items.len()];
        // (index in items, whether this call took the key in `held`)
        let mut asked: Vec<(usize, bool)> = Vec::with_capacity(items.len());
        {
            let mut held = self.lock();
            for (i, (record, key)) in items.iter().enumerate() {
                match held.get(*key) {
                    Some(holder) if *holder != id(record) => {}
                    Some(_) => asked.push((i, false)),
                    None => {
                        held.insert(key.to_string(), id(record));
                        asked.push((i, true));
                    }
                }
            }
        }
        if asked.is_empty() {
            return Ok(decisions);
        }
        let keys: Vec<String> = asked.iter().map(|&(i, _)| items[i].1.to_string()).collect();
        let result = self.timed("claim", self.store.claim(&keys)).await;
        let mut held = self.lock();
        let claims = match result {
            Ok(claims) => claims,
            Err(e) => {
                for &(i, taken) in &asked {
                    if taken {
                        held.remove(items[i].1);
                    }
                }
                return Err(e);
            }
        };
        for (&(i, _), claim) in asked.iter().zip(claims) {
            decisions[i] = match claim {
                Claim::Claimed => Decision::Deliver,
                Claim::Done => {
                    held.remove(items[i].1);
                    Decision::Duplicate
                }
                Claim::Busy => {
                    held.remove(items[i].1);
                    Decision::Wait
                }
            };
        }
        Ok(decisions)
    }

    /// Marks the keys done (the records were delivered or dead-lettered), in one round trip,
    /// and forgets them. On error the keys stay held: the caller tries again or gives up.
    pub async fn done(&self, items: &[(&Record, &str)]) -> Result<(), DedupError> {
        if items.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = items.iter().map(|(_, k)| k.to_string()).collect();
        self.timed("done", self.store.mark_done(&keys)).await?;
        self.forget(items);
        Ok(())
    }

    /// Releases the keys (the records will be delivered by someone else, or again later) and
    /// forgets them. Best effort: a lease that cannot be released expires after `lease_ttl`.
    /// Only keys these records hold are released: a key another record of this process
    /// holds keeps its lease (the store cannot tell the two apart).
    pub async fn release(&self, items: &[(&Record, &str)]) {
        let keys: Vec<String> = {
            let mut held = self.lock();
            let mut keys = Vec::new();
            for (record, key) in items {
                if held.get(*key).is_some_and(|holder| *holder == id(record)) {
                    held.remove(*key);
                    keys.push(key.to_string());
                }
            }
            keys
        };
        if keys.is_empty() {
            return;
        }
        if let Err(e) = self.timed("release", self.store.release(&keys)).await {
            tracing::warn!(error = %e, keys = keys.len(), "could not release dedup leases; they expire after dedup.lease_ttl");
        }
    }

    /// Forgets the keys these records hold here, without telling the store.
    pub fn forget(&self, items: &[(&Record, &str)]) {
        let mut held = self.lock();
        for (record, key) in items {
            if held.get(*key).is_some_and(|holder| *holder == id(record)) {
                held.remove(*key);
            }
        }
    }

    async fn timed<T>(&self, op: &str, call: impl Future<Output = Result<T, DedupError>>) -> Result<T, DedupError> {
        let started = Instant::now();
        let result = call.await;
        let labels = DedupLabels { op: op.to_string() };
        self.metrics
            .dedup_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if result.is_err() {
            self.metrics.dedup_errors.get_or_create(&labels).inc();
        }
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::DedupConfig;
    use bytes::Bytes;

    fn record(offset: i64) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            timestamp_ms: None,
            key: None,
            value: Some(Bytes::from_static(b"v")),
            headers: Vec::new(),
            generation: 0,
        }
    }

    async fn gate() -> Gate {
        let store = Dedup::connect_lazy(&DedupConfig::default(), "g").await.unwrap();
        Gate::new(store, OnError::Pause, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn two_records_of_this_process_with_one_key_are_never_both_delivered() {
        let g = gate().await;
        let (a, b) = (record(1), record(2));
        assert_eq!(g.claim(&[(&a, "k")]).await.unwrap(), [Decision::Deliver]);
        assert_eq!(g.claim(&[(&b, "k")]).await.unwrap(), [Decision::Wait], "a holds k");
        assert_eq!(
            g.claim(&[(&a, "k")]).await.unwrap(),
            [Decision::Deliver],
            "a retry refreshes its own lease"
        );
        g.done(&[(&a, "k")]).await.unwrap();
        assert_eq!(g.claim(&[(&b, "k")]).await.unwrap(), [Decision::Duplicate]);
    }

    #[tokio::test]
    async fn a_released_key_can_be_claimed_by_the_next_record_and_a_batch_claims_a_key_once() {
        let g = gate().await;
        let (a, b, c) = (record(1), record(2), record(3));
        assert_eq!(
            g.claim(&[(&a, "k"), (&b, "k"), (&c, "j")]).await.unwrap(),
            [Decision::Deliver, Decision::Wait, Decision::Deliver]
        );
        g.release(&[(&b, "k")]).await;
        assert_eq!(
            g.claim(&[(&c, "k")]).await.unwrap(),
            [Decision::Wait],
            "b never held k: releasing it leaves a's lease alone"
        );
        g.release(&[(&a, "k")]).await;
        assert_eq!(g.claim(&[(&b, "k")]).await.unwrap(), [Decision::Deliver]);
        let text = g.metrics.encode();
        assert!(
            text.contains("kafka_sidecar_dedup_duration_seconds_count{op=\"claim\"} 2"),
            "{text}"
        );
    }
}
