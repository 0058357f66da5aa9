//! Lag monitor: a thread with its own Kafka client that keeps lag true even when partitions
//! are paused or no records flow (a paused partition fetches nothing, so the consumer's own
//! view goes stale), and that confirms broker connectivity.
//!
//! On every assignment (within ~50 ms) and every `admin.lag_interval` it fetches, for each
//! assigned partition, the group's committed offset, the low and high watermarks and — for a
//! partition with a backlog but nothing in flight — the timestamp of its first unread record.
//! Lag in records and seconds is computed from these by [`crate::offsets`].
//!
//! The client has the consumer's `group.id` only to read committed offsets: it never
//! subscribes (so it never joins the group) and never commits (auto-commit and offset store
//! are off). To read a record's timestamp it assigns the partition by offset and polls one
//! record, then unassigns.
//!
//! While the brokers cannot be reached, nothing is fetched (every request would wait for its
//! timeout); instead one metadata request per second checks whether they answer again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::connectivity::{is_transport_error, Connectivity};
use crate::kafka_client::{connection_config, KafkaLogContext};
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, Reset, TopicPartition};

/// How often the loop wakes to look for new assignments and connectivity checks.
const TICK: Duration = Duration::from_millis(50);
/// Between connectivity checks while the brokers are unreachable (or suspected so).
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Shortest gap between two refreshes triggered by assignments (or retried after a failure).
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);
/// Timeout of one request to the brokers.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of a connectivity check (a metadata request any live broker answers at once).
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long to wait for the first records of backlogs whose age is wanted.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

type LagClient = BaseConsumer<KafkaLogContext>;

/// Starts the monitor thread; it stops when `stop` fires.
pub fn spawn(
    cfg: &Config,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    connectivity: Arc<Connectivity>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let client: LagClient = connection_config(cfg, "-lag")
        .set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Reading one record's timestamp needs little read-ahead.
        .set("fetch.message.max.bytes", "65536")
        .set("queued.max.messages.kbytes", "1024")
        .create_with_context(KafkaLogContext::new(connectivity.clone()))
        .map_err(|e| {
            let e = crate::config::redact::kafka_error(&e, "kafka.properties");
            anyhow::anyhow!("failed to create the lag monitor client: {e}")
        })?;
    let monitor = Monitor {
        client,
        tracker,
        metrics,
        connectivity,
        reset: Reset::from_config(&cfg.kafka.auto_offset_reset),
        probe_topic: cfg.kafka.topics.first().cloned().unwrap_or_default(),
        interval: cfg.admin.lag_interval,
    };
    std::thread::Builder::new()
        .name("lag-monitor".into())
        .spawn(move || monitor.run(&stop))?;
    Ok(())
}

struct Monitor {
    client: LagClient,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    connectivity: Arc<Connectivity>,
    reset: Reset,
    /// A configured topic, so connectivity checks ask for little metadata.
    probe_topic: String,
    interval: Duration,
}

impl Monitor {
    fn run(self, stop: &CancellationToken) {
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        let (mut last_check, mut last_refresh, mut last_metrics) = (long_ago, long_ago, long_ago);
        while !stop.is_cancelled() {
            if self.connectivity.needs_check() && last_check.elapsed() >= CHECK_EVERY {
                self.check_connectivity();
                last_check = Instant::now();
            }
            let due = last_refresh.elapsed() >= self.interval
                || (self.tracker.needs_refresh() && last_refresh.elapsed() >= MIN_REFRESH_GAP);
            if due && self.connectivity.is_connected() {
                if let Err(e) = self.refresh() {
                    self.failed(&e);
                }
                last_refresh = Instant::now();
                last_metrics = long_ago;
            }
            // Ages keep growing while nothing can be fetched.
            if last_metrics.elapsed() >= self.interval {
                self.metrics.set_partitions(&self.tracker.snapshot());
                last_metrics = Instant::now();
            }
            std::thread::sleep(TICK);
        }
    }

    /// One metadata request: answered means connected.
    fn check_connectivity(&self) {
        let topic = (!self.probe_topic.is_empty()).then_some(self.probe_topic.as_str());
        match self.client.fetch_metadata(topic, CHECK_TIMEOUT) {
            Ok(_) => self.connectivity.up(),
            Err(e) => self.connectivity.check_failed(&e.to_string()),
        }
    }

    /// A request failed: a transport failure makes the next tick check connectivity.
    fn failed(&self, e: &KafkaError) {
        if is_transport_error(e) {
            self.connectivity.suspect();
        }
        tracing::debug!(error = %e, "cannot refresh the consumer lag");
    }

    /// Committed offsets, watermarks, and the age of unread backlogs, for every assigned partition.
    fn refresh(&self) -> Result<(), KafkaError> {
        let targets = self.tracker.refresh_targets();
        if targets.is_empty() {
            return Ok(());
        }
        let committed = self.committed_offsets(&targets)?;
        for (tp, generation) in &targets {
            self.tracker
                .set_group_committed(tp, *generation, committed.get(tp).copied().flatten());
        }
        for (tp, generation) in &targets {
            match self.client.fetch_watermarks(&tp.topic, tp.partition, REQUEST_TIMEOUT) {
                Ok((low, high)) => self.tracker.set_watermarks(tp, *generation, low, high, self.reset),
                // Every other partition would time out too.
                Err(e) if is_transport_error(&e) => return Err(e),
                Err(e) => {
                    tracing::debug!(topic = %tp.topic, partition = tp.partition, error = %e, "cannot read the partition's watermarks")
                }
            }
        }
        self.connectivity.up();
        self.read_heads();
        Ok(())
    }

    /// The group's committed offset per partition (`None`: nothing committed).
    fn committed_offsets(
        &self,
        targets: &[(TopicPartition, u64)],
    ) -> Result<HashMap<TopicPartition, Option<i64>>, KafkaError> {
        let mut tpl = TopicPartitionList::with_capacity(targets.len());
        for (tp, _) in targets {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        // The returned list must be gone before the client is dropped (rd_kafka_destroy
        // hangs otherwise): it lives only in this function.
        let fetched = self.client.committed_offsets(tpl, REQUEST_TIMEOUT)?;
        let out = fetched
            .elements()
            .iter()
            .map(|e| {
                let offset = match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                };
                (TopicPartition::new(e.topic(), e.partition()), offset)
            })
            .collect();
        Ok(out)
    }

    /// Reads the first unread record of each backlog with nothing in flight, for its timestamp.
    fn read_heads(&self) {
        let wanted = self.tracker.heads_wanted();
        if wanted.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(wanted.len());
        for (tp, _, offset) in &wanted {
            // Only fails for an invalid offset enum; Offset::Offset is always valid.
            let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset));
        }
        if let Err(e) = self.client.assign(&tpl) {
            return tracing::debug!(error = %e, "cannot read the first unread records");
        }
        let mut left: HashMap<TopicPartition, (u64, i64)> = wanted.into_iter().map(|(tp, g, o)| (tp, (g, o))).collect();
        let deadline = Instant::now() + HEAD_TIMEOUT;
        while !left.is_empty() && Instant::now() < deadline {
            let Some(Ok(msg)) = self.client.poll(Duration::from_millis(100)) else {
                continue;
            };
            let tp = TopicPartition::new(msg.topic(), msg.partition());
            if let Some((generation, offset)) = left.remove(&tp) {
                // Offsets have gaps: the record read is the first at or after `offset`.
                self.tracker
                    .set_head(&tp, generation, offset, msg.timestamp().to_millis());
            }
        }
        if let Err(e) = self.client.unassign() {
            tracing::debug!(error = %e, "cannot unassign the lag monitor client");
        }
    }
}
