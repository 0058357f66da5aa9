//! Source: the Kafka consumer group member and its poll thread.
//!
//! The poll thread only reads, hands records to the scheduler and commits; it never runs
//! user work, so the group never times out while the app is slow. It owns the consumer:
//! commits, pause/resume and rebalance callbacks all happen on it, which serialises them.
//!
//! - Backpressure (see [`backpressure`]): at the in-flight limit the thread stops taking
//!   records and lets librdkafka keep its bounded prefetch; only when the pipeline stays too
//!   slow to read that prefetch soon (or the breaker opens) is every assigned partition
//!   paused, until in-flight falls below the resume threshold. Records are never buffered
//!   past the limit or dropped.
//! - Revoke: wait (up to `revoke_drain_timeout`) until the revoked partitions' records are
//!   finished, commit their watermark synchronously, then let the unassign happen. A lost
//!   assignment is not committed (another member owns it already).
//! - Shutdown: stop reading and pause; keep polling so the membership stays healthy while
//!   the workers drain; on `close`, commit synchronously and close the consumer, which
//!   leaves the group.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerState};
use crate::config::Config;
use crate::connectivity::{is_transport_error, Connectivity, KafkaLogContext};
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::record::Record;
use crate::retry::Backoff;
use crate::scheduler::{InFlight, Input};

mod backpressure;

pub use backpressure::Limits;
use backpressure::{Flow, Pressure};

/// Sleep between checks while holding at the in-flight limit.
const HOLD_TICK: Duration = Duration::from_millis(1);
/// How often partitions paused at their share are checked for resuming.
const SHARE_CHECK: Duration = Duration::from_millis(10);

/// State shared between the poll thread, its callbacks and the admin server.
#[derive(Default)]
pub struct SourceState {
    /// The member received its first assignment (possibly empty: an idle member).
    pub joined: AtomicBool,
    /// Partitions are paused by backpressure.
    pub paused: AtomicBool,
    /// Shutdown began: stop reading, do not wait in revoke callbacks.
    pub closing: AtomicBool,
    /// Whether the brokers can be reached.
    pub kafka: Arc<Connectivity>,
}

impl SourceState {
    pub fn new(brokers: &str) -> Self {
        Self {
            kafka: Arc::new(Connectivity::new(brokers)),
            ..Default::default()
        }
    }
}

/// librdkafka callbacks.
pub struct SourceContext {
    /// Log and error callbacks; transport failures feed the connectivity state.
    log: KafkaLogContext,
    tracker: Arc<OffsetTracker>,
    input: mpsc::Sender<Input>,
    state: Arc<SourceState>,
    metrics: Arc<Metrics>,
    drain_timeout: Duration,
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.log.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(error, reason);
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.metrics.rebalances.inc();
        match rebalance {
            Rebalance::Assign(tpl) => {
                let tps = topic_partitions(tpl);
                tracing::info!(partitions = %fmt_tps(&tps), "partitions assigned");
                self.tracker.assign(&tps);
            }
            Rebalance::Revoke(tpl) => self.on_revoke(consumer, topic_partitions(tpl)),
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.state.joined.store(true, Ordering::Relaxed);
            // New partitions join the paused state if backpressure is on.
            if self.state.paused.load(Ordering::Relaxed) && tpl.count() > 0 {
                if let Err(e) = consumer.pause(tpl) {
                    tracing::warn!(error = %e, "failed to pause newly assigned partitions");
                }
            }
        }
        let assigned = consumer.assignment().map_or(0, |a| a.count());
        self.metrics.assigned_partitions.set(assigned as i64);
    }
}

impl SourceContext {
    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tps: Vec<TopicPartition>) {
        let lost = consumer.assignment_lost();
        let closing = self.state.closing.load(Ordering::Relaxed);
        tracing::info!(partitions = %fmt_tps(&tps), lost, "partitions revoked");
        if !lost && !closing {
            // Let the workers finish what was read from these partitions, so that the
            // commit below covers it and the new owner does not deliver it again.
            let deadline = Instant::now() + self.drain_timeout;
            while self.tracker.unfinished(&tps) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let left = self.tracker.unfinished(&tps);
            if left > 0 {
                tracing::warn!(
                    records = left,
                    "revoke drain timed out; unfinished records will be redelivered by the new owner"
                );
            }
        }
        let final_positions = self.tracker.revoke(&tps);
        if !lost {
            commit_sync(consumer, &self.tracker, &self.metrics, &final_positions);
        }
        let msg = Input::Revoked(tps);
        let _ = if closing {
            self.input.try_send(msg).map_err(|_| ())
        } else {
            self.input.blocking_send(msg).map_err(|_| ())
        };
    }
}

pub type SourceConsumer = BaseConsumer<SourceContext>;

/// Builds the consumer. Fails on an invalid librdkafka property (bad TLS/SASL settings included).
pub fn create_consumer(
    cfg: &Config,
    tracker: Arc<OffsetTracker>,
    input: mpsc::Sender<Input>,
    state: Arc<SourceState>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<SourceConsumer> {
    let k = &cfg.kafka;
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("client.id", &k.client_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &k.auto_offset_reset)
        .set("partition.assignment.strategy", &k.assignment_strategy)
        .set("session.timeout.ms", k.session_timeout.as_millis().to_string())
        // Prefetch is memory too: cap librdkafka's queue relative to the in-flight bound (it
        // also caps fetch.max.bytes unless that is set), and refill it quickly.
        .set("queued.max.messages.kbytes", prefetch_kbytes(cfg).to_string())
        .set("fetch.queue.backoff.ms", "100")
        // Notice topics created after start (and partitions added) within seconds, not minutes.
        .set("topic.metadata.refresh.interval.ms", "10000");
    if !k.group_instance_id.is_empty() {
        cc.set("group.instance.id", &k.group_instance_id);
    }
    for (key, value) in &k.properties {
        cc.set(key, value);
    }
    let context = SourceContext {
        log: KafkaLogContext::new(state.kafka.clone()),
        tracker,
        input,
        state,
        metrics,
        drain_timeout: k.revoke_drain_timeout,
    };
    cc.create_with_context(context)
        .map_err(|e| anyhow::anyhow!("invalid Kafka consumer settings (kafka.* / kafka.properties): {e}"))
}

/// Connection and security settings (`security.protocol`, `sasl.*`, `ssl.*`, ...) shared by
/// every Kafka client the sidecar makes besides the consumer (DLQ producer, lag monitor).
pub fn connection_config(cfg: &Config, client_suffix: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("client.id", format!("{}{client_suffix}", cfg.kafka.client_id));
    for (k, v) in cfg.kafka.properties.iter().filter(|(k, _)| is_connection_property(k)) {
        cc.set(k, v);
    }
    cc
}

fn is_connection_property(key: &str) -> bool {
    [
        "security.protocol",
        "sasl.",
        "ssl.",
        "socket.",
        "broker.",
        "client.dns.lookup",
        "enable.ssl",
    ]
    .iter()
    .any(|p| key.starts_with(p))
}

impl Limits {
    pub fn from_config(cfg: &Config) -> Self {
        let p = &cfg.pipeline;
        let max_bytes = p.max_in_flight_bytes.as_u64() as usize;
        Self {
            max_records: p.max_in_flight_records,
            max_bytes,
            resume_records: (p.max_in_flight_records as f64 * p.resume_threshold) as usize,
            resume_bytes: (max_bytes as f64 * p.resume_threshold) as usize,
            // librdkafka counts these kilobytes as 1000 bytes.
            prefetch_bytes: prefetch_kbytes(cfg) * 1000,
        }
    }
}

/// librdkafka's prefetch cap (`queued.max.messages.kbytes`): `[kafka.properties]` if set there,
/// else half the in-flight byte bound, between 1 MiB and 64 MiB.
fn prefetch_kbytes(cfg: &Config) -> usize {
    cfg.kafka
        .properties
        .get("queued.max.messages.kbytes")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| (cfg.pipeline.max_in_flight_bytes.as_u64() as usize / 2 / 1024).clamp(1024, 65536))
}

/// Everything the poll thread needs.
pub struct PollLoop {
    pub consumer: SourceConsumer,
    pub topics: Vec<String>,
    pub brokers: String,
    pub input: mpsc::Sender<Input>,
    pub tracker: Arc<OffsetTracker>,
    pub in_flight: Arc<InFlight>,
    pub state: Arc<SourceState>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// While the breaker is open every partition stays paused.
    pub breaker: Arc<Breaker>,
    pub commit_interval: Duration,
    /// Stop reading (shutdown began).
    pub stop: CancellationToken,
    /// Commit and close the consumer (the drain is over).
    pub close: CancellationToken,
}

impl PollLoop {
    /// Runs the loop on a dedicated thread; the handle's result arrives when the consumer is closed.
    pub fn spawn(self) -> std::io::Result<tokio::sync::oneshot::Receiver<()>> {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("kafka-poll".into()).spawn(move || {
            self.run();
            let _ = done_tx.send(());
        })?;
        Ok(done_rx)
    }

    fn run(self) {
        if self.connect_and_subscribe() {
            self.read();
            self.drain();
        }
        self.state.closing.store(true, Ordering::Relaxed);
        let positions = self.tracker.positions_to_commit();
        commit_sync(&self.consumer, &self.tracker, &self.metrics, &positions);
        tracing::info!("closing the Kafka consumer (leaving the group)");
        let PollLoop { consumer, .. } = self;
        drop(consumer);
        tracing::info!("Kafka consumer closed");
    }

    /// Waits until the brokers answer, then subscribes. False if shutdown came first.
    fn connect_and_subscribe(&self) -> bool {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        loop {
            if self.stop.is_cancelled() {
                return false;
            }
            match self.consumer.fetch_metadata(None, Duration::from_secs(10)) {
                Ok(md) => {
                    self.state.kafka.up();
                    for topic in &self.topics {
                        let known = md.topics().iter().any(|t| t.name() == topic && t.error().is_none());
                        if !known {
                            tracing::error!(topic, "topic does not exist on the cluster; waiting for it to be created (check kafka.topics)");
                        }
                    }
                    break;
                }
                Err(e) => {
                    let delay = backoff.next_delay().max(Duration::from_millis(200));
                    // Logged once by the connectivity state, not per attempt.
                    self.state.kafka.check_failed(&e.to_string());
                    tracing::debug!(brokers = %self.brokers, error = %e, retry_in = ?delay, "cannot reach the Kafka brokers; retrying");
                    self.sleep_unless_stopped(delay);
                }
            }
        }
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        match self.consumer.subscribe(&topics) {
            Ok(()) => {
                tracing::info!(topics = ?self.topics, "subscribed");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "failed to subscribe");
                false
            }
        }
    }

    fn sleep_unless_stopped(&self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stop.is_cancelled() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn read(&self) {
        let mut topics: HashMap<String, Arc<str>> = HashMap::new();
        let mut errors = ErrorLog::default();
        let mut last_commit = Instant::now();
        let mut pressure = Pressure::new(self.limits, Instant::now());
        // Partitions paused on their own because they hold their share (slow pipeline).
        let mut capped = HashSet::new();
        let mut last_share_check = Instant::now();
        while !self.stop.is_cancelled() {
            let flow = self.apply_backpressure(&mut pressure, &capped);
            if last_share_check.elapsed() >= SHARE_CHECK {
                self.release_shares(&pressure, &mut capped);
                last_share_check = Instant::now();
            }
            if last_commit.elapsed() >= self.commit_interval {
                self.commit();
                last_commit = Instant::now();
            }
            if flow == Flow::Hold {
                std::thread::sleep(HOLD_TICK);
                continue;
            }
            let msg = match self.consumer.poll(Duration::from_millis(100)) {
                None => continue,
                Some(Err(e)) => {
                    errors.log(&e, &self.state.kafka);
                    continue;
                }
                Some(Ok(msg)) => msg,
            };
            self.state.kafka.up();
            let topic = match topics.get(msg.topic()) {
                Some(t) => t.clone(),
                None => {
                    let t: Arc<str> = msg.topic().into();
                    topics.insert(msg.topic().to_string(), t.clone());
                    t
                }
            };
            let tp = TopicPartition::new(topic.clone(), msg.partition());
            let generation = self.tracker.read(&tp, msg.offset(), msg.timestamp().to_millis());
            let record = Record::from_message(&msg, topic, generation);
            drop(msg);
            self.in_flight.add(record.size());
            pressure.on_read(record.size());
            self.metrics.record_outcome(&record, "consumed");
            if self.input.blocking_send(Input::Record(record)).is_err() {
                tracing::error!("scheduler stopped unexpectedly; stopping consumption");
                return;
            }
            if pressure.is_slow() {
                self.cap_share(&pressure, tp, &mut capped);
            }
        }
    }

    /// While the pipeline is slow, pauses a partition that holds its share of the record limit.
    fn cap_share(&self, pressure: &Pressure, tp: TopicPartition, capped: &mut HashSet<TopicPartition>) {
        let (share, _) = pressure.share(self.metrics.assigned_partitions.get() as usize);
        if capped.contains(&tp) || self.tracker.unfinished(std::slice::from_ref(&tp)) < share {
            return;
        }
        tracing::debug!(topic = %tp.topic, partition = tp.partition, share, "partition holds its share of a slow pipeline; pausing it");
        if !self.state.paused.load(Ordering::Relaxed) {
            self.pause_resume(std::slice::from_ref(&tp), true);
        }
        capped.insert(tp);
        self.update_paused_gauge(capped);
    }

    /// Resumes partitions paused at their share once they fall below its resume level, and all
    /// of them once the pipeline is no longer slow. Forgets partitions no longer assigned.
    fn release_shares(&self, pressure: &Pressure, capped: &mut HashSet<TopicPartition>) {
        if capped.is_empty() {
            return;
        }
        let (_, resume) = pressure.share(self.metrics.assigned_partitions.get() as usize);
        let assigned = self.tracker.partitions();
        let mut released = Vec::new();
        capped.retain(|tp| {
            let is_assigned = assigned.binary_search(tp).is_ok();
            let keep = is_assigned && pressure.is_slow() && self.tracker.unfinished(std::slice::from_ref(tp)) > resume;
            if !keep && is_assigned {
                released.push(tp.clone());
            }
            keep
        });
        if !released.is_empty() && !self.state.paused.load(Ordering::Relaxed) {
            tracing::debug!(partitions = %fmt_tps(&released), "resuming partitions paused at their share");
            self.pause_resume(&released, false);
        }
        self.update_paused_gauge(capped);
    }

    fn pause_resume(&self, tps: &[TopicPartition], pause: bool) {
        let mut tpl = TopicPartitionList::with_capacity(tps.len());
        for tp in tps {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let result = if pause {
            self.consumer.pause(&tpl)
        } else {
            self.consumer.resume(&tpl)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, pause, partitions = %fmt_tps(tps), "failed to pause/resume partitions");
        }
    }

    fn update_paused_gauge(&self, capped: &HashSet<TopicPartition>) {
        if !self.state.paused.load(Ordering::Relaxed) {
            self.metrics.paused_partitions.set(capped.len() as i64);
        }
    }

    /// Stop fetching and keep the membership alive until the workers drained.
    fn drain(&self) {
        self.set_paused(true, &HashSet::new());
        let _ = self.input.blocking_send(Input::End);
        let mut last_commit = Instant::now();
        while !self.close.is_cancelled() {
            // A record returned now is not handed over and not tracked, so no commit can
            // pass it: the next owner (or the restarted sidecar) reads it again.
            let _ = self.consumer.poll(Duration::from_millis(100));
            if last_commit.elapsed() >= Duration::from_secs(1) {
                self.commit();
                last_commit = Instant::now();
            }
        }
    }

    /// Decides whether this turn reads, holds or only polls, and pauses or resumes partitions.
    fn apply_backpressure(&self, pressure: &mut Pressure, capped: &HashSet<TopicPartition>) -> Flow {
        let (records, bytes) = self.in_flight.get();
        self.metrics.in_flight_records.set(records as i64);
        self.metrics.in_flight_bytes.set(bytes as i64);
        let flow = pressure.update(Instant::now(), records, bytes);
        // Open: every partition stays paused. Half-open: stay paused while records already
        // wait at the gate (one of them is the probe); resume only when none is left to probe with.
        let breaker_open = match self.breaker.state() {
            BreakerState::Open => true,
            BreakerState::HalfOpen => records > 0,
            BreakerState::Closed => false,
        };
        let pause = breaker_open || flow == Flow::Paused;
        if pause != self.state.paused.load(Ordering::Relaxed) {
            if breaker_open && pause {
                tracing::warn!("circuit breaker open: pausing every partition until the app recovers");
            } else if pause {
                tracing::debug!(
                    records,
                    bytes,
                    "the pipeline is too slow to read the prefetch soon; pausing partitions"
                );
            } else {
                tracing::debug!(records, bytes, "resuming partitions");
            }
            self.set_paused(pause, capped);
        }
        if breaker_open {
            Flow::Paused
        } else {
            flow
        }
    }

    /// Pauses every assigned partition, or resumes all but those paused at their share.
    fn set_paused(&self, pause: bool, capped: &HashSet<TopicPartition>) {
        self.state.paused.store(pause, Ordering::Relaxed);
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => return tracing::warn!(error = %e, "cannot read the assignment"),
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            let mut resume = TopicPartitionList::with_capacity(assignment.count());
            for e in assignment.elements() {
                if !capped.contains(&TopicPartition::new(e.topic(), e.partition())) {
                    resume.add_partition(e.topic(), e.partition());
                }
            }
            self.consumer.resume(&resume)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, pause, "failed to pause/resume partitions");
        }
        let paused = if pause { assignment.count() } else { capped.len() };
        self.metrics.paused_partitions.set(paused as i64);
    }

    /// Periodic commit. Synchronous: it runs on this dedicated thread, takes one round trip,
    /// and its result updates the tracker directly (async commit results arrive, if at all,
    /// through librdkafka's event queue).
    fn commit(&self) {
        // While the brokers cannot be reached a commit would only block this thread until it
        // times out (and log an error each interval); the first interval after they answer
        // again commits the same positions.
        if !self.state.kafka.is_connected() {
            return;
        }
        let positions = self.tracker.positions_to_commit();
        commit_sync(&self.consumer, &self.tracker, &self.metrics, &positions);
    }
}

fn commit_sync(
    consumer: &SourceConsumer,
    tracker: &OffsetTracker,
    metrics: &Metrics,
    positions: &[(TopicPartition, i64)],
) {
    if positions.is_empty() {
        return;
    }
    match consumer.commit(&to_tpl(positions), CommitMode::Sync) {
        Ok(()) => {
            tracker.committed(positions);
            metrics.commit(true);
            tracing::debug!(positions = %fmt_positions(positions), "committed offsets");
        }
        Err(e) => {
            metrics.commit(false);
            tracing::error!(error = %e, positions = %fmt_positions(positions), "synchronous offset commit failed; these records may be delivered again");
        }
    }
}

/// Logs consumer errors at most once per 10 s per distinct message. Transport errors go to
/// the connectivity state instead, which logs an outage once.
#[derive(Default)]
struct ErrorLog(HashMap<String, Instant>);

impl ErrorLog {
    fn log(&mut self, e: &KafkaError, kafka: &Connectivity) {
        if is_transport_error(e) {
            kafka.suspect();
            return tracing::debug!(error = %e, "kafka consumer transport error");
        }
        let msg = e.to_string();
        let now = Instant::now();
        if self
            .0
            .get(&msg)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(10))
        {
            return;
        }
        tracing::error!(error = %msg, "kafka consumer error");
        self.0.insert(msg, now);
    }
}

fn to_tpl(positions: &[(TopicPartition, i64)]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(positions.len());
    for (tp, pos) in positions {
        // Only fails for an invalid offset enum; Offset::Offset is always valid.
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*pos));
    }
    tpl
}

fn topic_partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

fn fmt_tps(tps: &[TopicPartition]) -> String {
    tps.iter()
        .map(|tp| format!("{}/{}", tp.topic, tp.partition))
        .collect::<Vec<_>>()
        .join(",")
}

fn fmt_positions(p: &[(TopicPartition, i64)]) -> String {
    p.iter()
        .map(|(tp, o)| format!("{}/{}@{}", tp.topic, tp.partition, o))
        .collect::<Vec<_>>()
        .join(",")
}
