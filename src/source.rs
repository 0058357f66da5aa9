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
//! - Revoke: wait (up to `revoke_drain_timeout`, and once shutdown began no longer than its
//!   drain deadline) until the revoked partitions' records are finished, commit their
//!   watermark synchronously, then let the unassign happen. A lost assignment is not
//!   committed (another member owns it already). The wait is woken by the offset tracker
//!   when records finish, not by polling it.
//! - Shutdown: stop reading and pause; keep polling so the membership stays healthy while
//!   the workers drain; on `close`, commit synchronously and close the consumer, which
//!   leaves the group.
//! - Start-up: until the brokers answer, retry with backoff (never exit). A rejected login
//!   (SASL) or a failed TLS handshake is named as such, with the settings to check, instead of
//!   "cannot reach the brokers".
//! - Faults: the thread's work and the rebalance callbacks are panic-safe (a panic must not
//!   unwind into librdkafka, which would abort the process). If reading panics or stops on its
//!   own (a callback panicked, the scheduler is gone, subscribing failed), the thread reports
//!   it ([`PollThread::failed`]) and still drains, commits what is finished and closes the
//!   consumer when told to.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Breaker, BreakerState};
use crate::config::Config;
use crate::connectivity::{is_transport_error, Connectivity};
use crate::kafka_client::KafkaLogContext;
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::pipeline::{panic_message, InFlight, Input};
use crate::record::Record;
use crate::retry::Backoff;
use crate::retry_topics::{self, Tiers};

mod backpressure;

pub use backpressure::Limits;
use backpressure::{Flow, Pressure};

/// Longest wait while holding at the in-flight limit before the loop looks again (commit
/// interval, rate window, breaker). A release of records ends the wait at once.
const HOLD_WAIT: Duration = Duration::from_millis(50);
/// Poll between tries of a final commit refused by a rebalance.
const FINAL_COMMIT_POLL: Duration = Duration::from_millis(100);
/// The poll loop's maps, looked up per record or per poll: foldhash (seeded per process,
/// like std's RandomState) instead of SipHash.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type TpSet = HashSet<TopicPartition, foldhash::fast::RandomState>;

/// The most records the poll thread hands over in one message. While records are ready
/// without waiting it reads on (polls that do not wait) up to this many; a poll that finds
/// nothing hands the run over at once, so a record waits at most for the reading of the
/// records after it in the same run (microseconds each).
const RUN: usize = 64;

/// How often partitions paused at their share are checked for resuming.
const SHARE_CHECK: Duration = Duration::from_millis(10);

/// State shared between the poll thread, its callbacks and the admin server.
#[derive(Default)]
pub struct SourceState {
    /// The member received its first assignment (possibly empty: an idle member).
    pub joined: AtomicBool,
    /// Partitions are paused by backpressure.
    pub paused: AtomicBool,
    /// The drain is over: do not wait in revoke callbacks.
    pub closing: AtomicBool,
    /// Before joining: the authentication or TLS failure that is the latest known cause of the
    /// brokers being unusable, for the connect loop's log line. librdkafka reports it as an
    /// error event (and suppresses repeats of it), not as the metadata request's error.
    security_failure: Mutex<Option<SecurityFailure>>,
    /// Once shutdown began: when its drain ends (revoke callbacks wait no longer than this),
    /// and until when the final commit may be retried while a rebalance refuses it.
    shutdown_deadlines: Mutex<Option<(Instant, Instant)>>,
    /// A panic caught in a librdkafka callback, for the poll thread to report.
    fault: Mutex<Option<String>>,
    /// Retry tier partitions paused until their head record is due: that record (read, not
    /// yet handed over nor tracked, so no commit passes it) and its due time (ms since the
    /// epoch). At most one per tier partition; a revoke drops it (it is read again).
    held: Mutex<FastMap<TopicPartition, (Record, i64)>>,
    /// Whether the brokers can be reached.
    pub kafka: Arc<Connectivity>,
    /// Records read and counted in flight, not yet handed over: the poll thread hands them
    /// to the scheduler in runs of up to [`RUN`] (see [`Input::Records`]). Only the poll
    /// thread touches it (the lock is never contended): it hands the run over before any
    /// poll that may wait and before holding at the in-flight limit, and a revoke callback
    /// hands it over before waiting for the revoked partitions' records to finish.
    run: Mutex<Vec<Record>>,
}

/// Why the brokers refused a connection that reached them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecurityFailureKind {
    /// SASL login rejected (wrong user, password or mechanism).
    Authentication,
    /// TLS handshake failed (unknown CA, certificate not matching the broker address, ...).
    Tls,
}

impl SecurityFailureKind {
    /// Whether a librdkafka error event means the connection was refused for security
    /// reasons. A failed TLS handshake mostly comes as a transport failure whose reason
    /// (librdkafka's text, from OpenSSL) names SSL.
    fn classify(code: RDKafkaErrorCode, reason: &str) -> Option<Self> {
        match code {
            RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed => Some(Self::Authentication),
            RDKafkaErrorCode::SSL => Some(Self::Tls),
            RDKafkaErrorCode::BrokerTransportFailure if reason.contains("SSL") => Some(Self::Tls),
            _ => None,
        }
    }

    /// The log line: what failed and which settings to check.
    fn message(self) -> &'static str {
        match self {
            Self::Authentication => {
                "kafka authentication failed: the brokers rejected the SASL login; check sasl.mechanism, \
                 sasl.username and sasl.password in [kafka.properties]; retrying"
            }
            Self::Tls => {
                "kafka TLS handshake failed; check ssl.ca.location (the CA that signed the brokers' \
                 certificates) and that kafka.brokers names the hosts in those certificates; retrying"
            }
        }
    }
}

/// A security failure and librdkafka's description of it (never contains the password).
#[derive(Debug, Clone)]
struct SecurityFailure {
    kind: SecurityFailureKind,
    reason: String,
}

impl SourceState {
    pub fn new(brokers: &str) -> Self {
        Self {
            kafka: Arc::new(Connectivity::new(brokers)),
            ..Default::default()
        }
    }

    fn security_failure(&self) -> Option<SecurityFailure> {
        self.security_failure.lock().ok()?.clone()
    }

    fn set_security_failure(&self, failure: Option<SecurityFailure>) {
        if let Ok(mut slot) = self.security_failure.lock() {
            *slot = failure;
        }
    }

    /// Shutdown began and its drain ends at `drain`: a revoke drain under way or to come
    /// waits no longer than that, so the final commit and the group leave still fit in the
    /// grace period. A final commit refused by a rebalance is retried until `commit`.
    pub fn begin_shutdown(&self, drain: Instant, commit: Instant, tracker: &OffsetTracker) {
        *self.shutdown_deadlines.lock().unwrap_or_else(PoisonError::into_inner) = Some((drain, commit));
        tracker.wake_waiters();
    }

    fn shutdown_deadline(&self) -> Option<Instant> {
        self.deadlines().map(|(drain, _)| drain)
    }

    fn final_commit_deadline(&self) -> Option<Instant> {
        self.deadlines().map(|(_, commit)| commit)
    }

    fn record_fault(&self, reason: String) {
        self.fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(reason);
    }

    fn take_fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Adds a record read to the run; `true` when the run is full and is to be handed over.
    fn add_to_run(&self, record: Record) -> bool {
        let mut run = self.run.lock().unwrap_or_else(|e| e.into_inner());
        run.push(record);
        run.len() >= RUN
    }

    fn run_is_empty(&self) -> bool {
        self.run.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Hands the run over; an error when the scheduler is gone. Blocks while the channel
    /// is full unless `closing` (then a full channel drops the run: nothing more is
    /// delivered after the drain, and the records are not committed).
    ///
    /// The run's records are counted as `consumed` here, once per stretch of one topic.
    fn hand_over_run(&self, input: &mpsc::Sender<Input>, metrics: &Metrics, closing: bool) -> Result<(), ()> {
        let run = std::mem::take(&mut *self.run.lock().unwrap_or_else(|e| e.into_inner()));
        if run.is_empty() {
            return Ok(());
        }
        for stretch in run.chunk_by(|a, b| Arc::ptr_eq(&a.topic, &b.topic)) {
            metrics.count_outcome(&stretch[0].topic, "consumed", stretch.len() as u64);
        }
        let msg = Input::Records(run);
        if closing {
            input.try_send(msg).map_err(|_| ())
        } else {
            input.blocking_send(msg).map_err(|_| ())
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, FastMap<TopicPartition, (Record, i64)>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_held(&self, tp: &TopicPartition) -> bool {
        self.held().contains_key(tp)
    }

    /// Takes the held records due at `now_ms`.
    fn take_due(&self, now_ms: i64) -> Vec<(TopicPartition, Record)> {
        let mut held = self.held();
        let due: Vec<TopicPartition> = held
            .iter()
            .filter(|(_, (_, at))| *at <= now_ms)
            .map(|(tp, _)| tp.clone())
            .collect();
        due.into_iter()
            .filter_map(|tp| held.remove(&tp).map(|(r, _)| (tp, r)))
            .collect()
    }

    fn deadlines(&self) -> Option<(Instant, Instant)> {
        *self.shutdown_deadlines.lock().unwrap_or_else(PoisonError::into_inner)
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
        let code = error.rdkafka_error_code();
        let joined = self.state.joined.load(Ordering::Relaxed);
        match code.and_then(|c| SecurityFailureKind::classify(c, reason)) {
            // Before joining, the connect loop logs it once per retry, with the fix.
            Some(kind) if !joined => {
                self.state.kafka.report(reason);
                self.state.set_security_failure(Some(SecurityFailure {
                    kind,
                    reason: reason.to_string(),
                }))
            }
            Some(kind) => {
                // Also why the brokers cannot be reached: /status shows it.
                self.state.kafka.report(reason);
                tracing::error!(target: "librdkafka", reason, "{}", kind.message())
            }
            None => {
                // A connection that fails for another reason (refused, unresolvable) is the
                // cause now; "all brokers down" is only the consequence of either.
                if !joined && code != Some(RDKafkaErrorCode::AllBrokersDown) {
                    self.state.set_security_failure(None);
                }
                self.log.error(error, reason);
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.guarded("rebalance", || {
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
        });
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.guarded("rebalance", || {
            if let Rebalance::Assign(tpl) = rebalance {
                self.state.joined.store(true, Ordering::Relaxed);
                // New partitions join the paused state if backpressure is on, and are resumed
                // explicitly otherwise: librdkafka keeps a partition's pause flag across a
                // revoke, so a partition this member paused (at its share, or holding a retry
                // tier record) and that comes back to it would never be read again.
                if tpl.count() > 0 {
                    let pause = self.state.paused.load(Ordering::Relaxed);
                    let result = if pause {
                        consumer.pause(tpl)
                    } else {
                        consumer.resume(tpl)
                    };
                    if let Err(e) = result {
                        tracing::warn!(error = %e, pause, "failed to pause/resume newly assigned partitions");
                    }
                }
            }
            let assigned = consumer.assignment().map_or(0, |a| a.count());
            self.metrics.assigned_partitions.set(assigned as i64);
        });
    }
}

impl SourceContext {
    /// Runs the body of a librdkafka callback. A panic must not unwind into librdkafka (that
    /// aborts the process, skipping the final commit and the group leave): it is caught and
    /// recorded as a fault, on which the poll thread stops reading and shuts down cleanly.
    fn guarded(&self, callback: &str, body: impl FnOnce()) {
        if let Err(panic) = catch_unwind(AssertUnwindSafe(body)) {
            let reason = format!("the Kafka {callback} callback panicked: {}", panic_message(&*panic));
            tracing::error!("{reason}");
            self.state.record_fault(reason);
        }
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tps: Vec<TopicPartition>) {
        let lost = consumer.assignment_lost();
        let closing = self.state.closing.load(Ordering::Relaxed);
        tracing::info!(partitions = %fmt_tps(&tps), lost, "partitions revoked");
        // Records read but not handed over yet: to the scheduler first, so that the drain
        // below can finish them (and the Revoked message after them drops the rest).
        let _ = self.state.hand_over_run(&self.input, &self.metrics, closing);
        if !lost && !closing {
            // Let the workers finish what was read from these partitions, so that the
            // commit below covers it and the new owner does not deliver it again.
            let timeout = deadline_after(self.drain_timeout);
            let deadline = || self.state.shutdown_deadline().map_or(timeout, |d| d.min(timeout));
            let left = self.tracker.wait_finished(&tps, deadline);
            if left > 0 && self.state.shutdown_deadline().is_some_and(|d| d < timeout) {
                tracing::warn!(
                    records = left,
                    "revoke drain cut short by the shutdown deadline (shutdown.grace_period); \
                     unfinished records will be redelivered by the new owner"
                );
            } else if left > 0 {
                tracing::warn!(
                    records = left,
                    "revoke drain timed out; unfinished records will be redelivered by the new owner"
                );
            }
        }
        // Held tier records are not tracked: the next owner reads them again.
        self.state.held().retain(|tp, _| !tps.contains(tp));
        let mut positions = self.tracker.revoke(&tps);
        if !lost {
            // The kept partitions too: no periodic commit ran while this callback waited, and
            // the rebalance that follows refuses commits until it completes.
            positions.extend(self.tracker.positions_to_commit());
            positions.sort();
            commit_sync(consumer, &self.tracker, &self.metrics, &positions);
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
        // Notice topics created after start (and partitions added) within seconds, not minutes.
        .set("topic.metadata.refresh.interval.ms", "10000");
    for (key, value) in fetch_settings(cfg) {
        cc.set(key, value);
    }
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
    cc.create_with_context(context).map_err(|e| {
        let e = crate::config::redact::kafka_error(&e, "kafka.properties");
        anyhow::anyhow!("invalid Kafka consumer settings (kafka.* / kafka.properties): {e}")
    })
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

/// The consumer settings that shape fetching, as [`create_consumer`] sets them (the bench's
/// latency floor, examples/latency_floor.rs, fetches with them too). Prefetch is memory too:
/// librdkafka's queue is capped relative to the in-flight bound (which also caps
/// fetch.max.bytes unless that is set), and refilled quickly.
pub fn fetch_settings(cfg: &Config) -> [(&'static str, String); 2] {
    [
        ("queued.max.messages.kbytes", prefetch_kbytes(cfg).to_string()),
        ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string()),
    ]
}

/// How soon librdkafka fetches again after finding its queue over `queued.max.messages.kbytes`
/// (its default is 1000 ms). The queue must be refilled before it runs dry: a batch-mode
/// pipeline reads 16 MB of 1 KiB records in under 50 ms, and at 100 ms the fetcher sat idle
/// for half of every refill (200k records/s at 100 ms, 355k at 10 ms, 290k at 50 ms:
/// BENCHMARKS.md "Changes, measured"). A full queue costs a wake-up of the broker thread per
/// backoff, nothing more; a paused partition is not fetched at all.
const FETCH_QUEUE_BACKOFF_MS: u32 = 10;

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
    /// The source topics and the retry tier topics.
    pub topics: Vec<String>,
    /// Retry tiers: a record read from one is held until its not-before time.
    pub tiers: Option<Arc<Tiers>>,
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

/// The running poll thread, as the app sees it.
pub struct PollThread {
    /// Resolves with the reason when the thread stopped reading before shutdown asked it to
    /// (it panicked, the scheduler is gone, subscribing failed). The thread then drains as in
    /// a shutdown. Resolves with an error only if the thread died without saying why.
    pub failed: tokio::sync::oneshot::Receiver<String>,
    /// Resolves when the consumer is closed (the group left), with a problem met on the way
    /// (a panic while draining, committing or closing), if any.
    pub closed: tokio::sync::oneshot::Receiver<Option<String>>,
}

impl PollLoop {
    /// Runs the loop on a dedicated thread.
    pub fn spawn(self) -> std::io::Result<PollThread> {
        let (failed_tx, failed) = tokio::sync::oneshot::channel();
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name("kafka-poll".into()).spawn(move || {
            let problem = self.run(failed_tx);
            let _ = closed_tx.send(problem);
        })?;
        Ok(PollThread { failed, closed })
    }

    /// Reads until stopped, drains until `close`, commits and closes the consumer. A panic in
    /// any step is caught and reported, and the steps after it still run: whatever happens,
    /// what is finished is committed and the group is left.
    fn run(self, failed: tokio::sync::oneshot::Sender<String>) -> Option<String> {
        let stopped_early = match catch_unwind(AssertUnwindSafe(|| self.read_until_stopped())) {
            Ok(Ok(())) => None,
            Ok(Err(reason)) => Some(reason),
            Err(panic) => Some(format!("the Kafka poll thread panicked: {}", panic_message(&*panic))),
        };
        if let Some(reason) = stopped_early {
            tracing::error!("{reason}; draining what was read, then committing and leaving the group");
            let _ = failed.send(reason);
        }
        let mut problem = None;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.drain())) {
            problem = Some(format!(
                "the Kafka poll thread panicked while draining: {}",
                panic_message(&*panic)
            ));
        }
        self.state.closing.store(true, Ordering::Relaxed);
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.final_commit())) {
            problem = Some(format!("the final offset commit panicked: {}", panic_message(&*panic)));
        }
        tracing::info!("closing the Kafka consumer (leaving the group)");
        let PollLoop { consumer, .. } = self;
        match catch_unwind(AssertUnwindSafe(|| drop(consumer))) {
            Ok(()) => tracing::info!("Kafka consumer closed"),
            Err(panic) => {
                problem = Some(format!(
                    "closing the Kafka consumer panicked: {}",
                    panic_message(&*panic)
                ))
            }
        }
        // A callback that panicked after reading ended (during the drain or the close).
        if let Some(fault) = self.state.take_fault() {
            problem.get_or_insert(fault);
        }
        if let Some(problem) = &problem {
            tracing::error!("{problem}");
        }
        problem
    }

    /// Connects, subscribes and reads until `stop`. An error names why it stopped before.
    fn read_until_stopped(&self) -> Result<(), String> {
        if !self.connect_and_subscribe() {
            if self.stop.is_cancelled() {
                return Ok(());
            }
            return Err("subscribing to the topics failed".into());
        }
        self.read()
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
                    self.state.set_security_failure(None);
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
                    // The client's error events say whether the brokers refused the login or
                    // the TLS handshake; they arrive through polling.
                    self.serve_events(Duration::from_millis(200));
                    match self.state.security_failure() {
                        // Needs a fix: named with the settings to check on every retry.
                        Some(f) => {
                            tracing::error!(brokers = %self.brokers, reason = %f.reason, retry_in = ?delay, "{}", f.kind.message())
                        }
                        // Logged once by the connectivity state, not per attempt.
                        None => self.state.kafka.check_failed(&e.to_string()),
                    }
                    tracing::debug!(brokers = %self.brokers, error = %e, retry_in = ?delay, "cannot reach the Kafka brokers; retrying");
                    self.serve_events(delay);
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

    /// Polls the not yet subscribed consumer for `d` (or until shutdown): serves its log and
    /// error events, so that callbacks run; it has no partitions, so no record can arrive.
    fn serve_events(&self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stop.is_cancelled() {
            // Errors went to the context's `error` callback already.
            let _ = self.consumer.poll(Duration::from_millis(50));
        }
    }

    /// Reads until `stop`; an error when the scheduler stopped taking records.
    fn read(&self) -> Result<(), String> {
        let mut topics: FastMap<String, Arc<str>> = FastMap::default();
        let mut errors = ErrorLog::default();
        let mut last_commit = Instant::now();
        let mut pressure = Pressure::new(self.limits, Instant::now());
        // Partitions paused on their own because they hold their share (slow pipeline).
        let mut capped = TpSet::default();
        let mut last_share_check = Instant::now();
        while !self.stop.is_cancelled() {
            if let Some(fault) = self.state.take_fault() {
                return Err(fault);
            }
            let seen = self.in_flight.get();
            // One clock read per turn (a turn per record): the vDSO clock is not free in a VM.
            let now = Instant::now();
            let flow = self.apply_backpressure(&mut pressure, &capped, seen, now);
            if now.saturating_duration_since(last_share_check) >= SHARE_CHECK {
                self.release_shares(&pressure, &mut capped);
                last_share_check = now;
            }
            if now.saturating_duration_since(last_commit) >= self.commit_interval {
                self.commit();
                last_commit = Instant::now();
            }
            if flow == Flow::Hold {
                // No poll while holding: it would hand over a record. Holding ends within a
                // rate window (or partitions are paused and polled), well within max.poll.interval.
                self.hand_over_run()?;
                self.in_flight.wait_for_release(pressure.hold_target(), HOLD_WAIT);
                continue;
            }
            self.release_due(&mut pressure, &mut capped)?;
            // With a run begun, only what is ready now is read into it.
            let wait = if self.state.run_is_empty() {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            };
            let msg = match self.consumer.poll(wait) {
                None => {
                    self.hand_over_run()?;
                    continue;
                }
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
            let delay = self
                .tiers
                .as_ref()
                .and_then(|t| t.get(t.index_of(&topic)?))
                .map(|t| t.delay);
            if let Some(delay) = delay {
                // A retry tier: its head waits for its not-before time, the partition paused.
                if self.state.is_held(&tp) {
                    // Fetched before the pause took effect: read again after the held record.
                    continue;
                }
                let record = Record::from_message(&msg, topic, 0);
                drop(msg);
                let now = retry_topics::now_ms();
                let due = retry_topics::not_before(&record, delay, now);
                if due > now {
                    self.hold(tp, record, due);
                } else {
                    self.hand_over_read(tp, record, &mut pressure, &mut capped)?;
                }
                continue;
            }
            let generation = self.tracker.read(&tp, msg.offset(), msg.timestamp().to_millis());
            let record = Record::from_message(&msg, topic, generation);
            drop(msg);
            self.hand_over(tp, record, &mut pressure, &mut capped)?;
        }
        self.hand_over_run()
    }

    /// Hands the records read so far to the scheduler (one message).
    fn hand_over_run(&self) -> Result<(), String> {
        self.state
            .hand_over_run(&self.input, &self.metrics, false)
            .map_err(|()| "the scheduler stopped taking records".to_string())
    }

    /// Adds a record read now (its generation set) to the run for the scheduler, counted in
    /// flight; hands the run over once it is full.
    fn hand_over(
        &self,
        tp: TopicPartition,
        record: Record,
        pressure: &mut Pressure,
        capped: &mut TpSet,
    ) -> Result<(), String> {
        self.in_flight.add(record.size());
        pressure.on_read(record.size());
        if self.state.add_to_run(record) {
            self.hand_over_run()?;
        }
        if pressure.is_slow() {
            self.cap_share(pressure, tp, capped);
        }
        Ok(())
    }

    /// Tracks a record read earlier (a due retry tier record) and hands it over.
    fn hand_over_read(
        &self,
        tp: TopicPartition,
        mut record: Record,
        pressure: &mut Pressure,
        capped: &mut TpSet,
    ) -> Result<(), String> {
        record.generation = self.tracker.read(&tp, record.offset, record.timestamp_ms);
        self.hand_over(tp, record, pressure, capped)
    }

    /// Holds a retry tier record until `due` (ms since the epoch): its partition is paused,
    /// so the poll thread keeps reading every other partition and nothing busy-waits.
    fn hold(&self, tp: TopicPartition, record: Record, due: i64) {
        tracing::debug!(topic = %tp.topic, partition = tp.partition, offset = record.offset, due,
            "retry tier record not due yet; pausing its partition until then");
        self.pause_resume(std::slice::from_ref(&tp), true);
        self.state.held().insert(tp, (record, due));
    }

    /// Hands over the held retry tier records that are due, and reads their partitions on
    /// from the record after (anything fetched before the pause took effect was skipped).
    fn release_due(&self, pressure: &mut Pressure, capped: &mut TpSet) -> Result<(), String> {
        if self.tiers.is_none() {
            return Ok(());
        }
        for (tp, record) in self.state.take_due(retry_topics::now_ms()) {
            let next = record.offset.saturating_add(1);
            self.hand_over_read(tp.clone(), record, pressure, capped)?;
            if let Err(e) = self
                .consumer
                .seek(&tp.topic, tp.partition, Offset::Offset(next), Duration::ZERO)
            {
                tracing::warn!(topic = %tp.topic, partition = tp.partition, error = %e, "cannot seek a retry tier partition");
            }
            if !self.state.paused.load(Ordering::Relaxed) && !capped.contains(&tp) {
                self.pause_resume(std::slice::from_ref(&tp), false);
            }
        }
        Ok(())
    }

    /// While the pipeline is slow, pauses a partition that holds its share of the record limit.
    fn cap_share(&self, pressure: &Pressure, tp: TopicPartition, capped: &mut TpSet) {
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
    fn release_shares(&self, pressure: &Pressure, capped: &mut TpSet) {
        if capped.is_empty() {
            return;
        }
        let (_, resume) = pressure.share(self.metrics.assigned_partitions.get() as usize);
        let assigned = self.tracker.partitions();
        let mut released = Vec::new();
        capped.retain(|tp| {
            let is_assigned = assigned.binary_search(tp).is_ok();
            let keep = is_assigned && pressure.is_slow() && self.tracker.unfinished(std::slice::from_ref(tp)) > resume;
            if !keep && is_assigned && !self.state.is_held(tp) {
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

    fn update_paused_gauge(&self, capped: &TpSet) {
        if !self.state.paused.load(Ordering::Relaxed) {
            self.metrics.paused_partitions.set(capped.len() as i64);
        }
    }

    /// Stop fetching and keep the membership alive until the workers drained.
    fn drain(&self) {
        self.set_paused(true, &TpSet::default());
        // What was read before stopping is delivered; then nothing more.
        let _ = self.hand_over_run();
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
    fn apply_backpressure(
        &self,
        pressure: &mut Pressure,
        capped: &TpSet,
        (records, bytes): (usize, usize),
        now: Instant,
    ) -> Flow {
        self.metrics.in_flight_records.set(records as i64);
        self.metrics.in_flight_bytes.set(bytes as i64);
        let flow = pressure.update(now, records, bytes);
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
    fn set_paused(&self, pause: bool, capped: &TpSet) {
        self.state.paused.store(pause, Ordering::Relaxed);
        let assignment = match self.consumer.assignment() {
            Ok(a) => a,
            Err(e) => return tracing::warn!(error = %e, "cannot read the assignment"),
        };
        let result = if pause {
            self.consumer.pause(&assignment)
        } else {
            let mut resume = TopicPartitionList::with_capacity(assignment.count());
            let held = self.state.held();
            for e in assignment.elements() {
                let tp = TopicPartition::new(e.topic(), e.partition());
                // Held retry tier partitions stay paused until their head record is due.
                if !capped.contains(&tp) && !held.contains_key(&tp) {
                    resume.add_partition(e.topic(), e.partition());
                }
            }
            drop(held);
            self.consumer.resume(&resume)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, pause, "failed to pause/resume partitions");
        }
        let paused = if pause { assignment.count() } else { capped.len() };
        self.metrics.paused_partitions.set(paused as i64);
    }

    /// The commit before closing. A commit refused because a rebalance is under way (say the
    /// one a revoke during the drain started) is tried again, polling in between so that the
    /// member rejoins, until the final-commit deadline of the shutdown.
    fn final_commit(&self) {
        loop {
            let positions = self.tracker.positions_to_commit();
            let error = match try_commit(&self.consumer, &self.tracker, &self.metrics, &positions) {
                Ok(()) => return,
                Err(e) => e,
            };
            let retry = refused_by_rebalance(&error)
                && self
                    .state
                    .final_commit_deadline()
                    .is_some_and(|until| Instant::now() + FINAL_COMMIT_POLL < until);
            if !retry {
                return tracing::error!(error = %error, positions = %fmt_positions(&positions), "final offset commit failed; these records will be delivered again");
            }
            tracing::debug!(error = %error, "final commit refused during a rebalance; polling and trying again");
            // A record returned now is not handed over and not tracked (as in the drain).
            let _ = self.consumer.poll(FINAL_COMMIT_POLL);
        }
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

/// `now + d`, or a far-off instant when that does not fit.
fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

fn commit_sync(
    consumer: &SourceConsumer,
    tracker: &OffsetTracker,
    metrics: &Metrics,
    positions: &[(TopicPartition, i64)],
) {
    if let Err(e) = try_commit(consumer, tracker, metrics, positions) {
        tracing::error!(error = %e, positions = %fmt_positions(positions), "synchronous offset commit failed; these records may be delivered again");
    }
}

/// Commits synchronously and records the result (tracker, metrics), without logging a failure.
fn try_commit(
    consumer: &SourceConsumer,
    tracker: &OffsetTracker,
    metrics: &Metrics,
    positions: &[(TopicPartition, i64)],
) -> Result<(), KafkaError> {
    if positions.is_empty() {
        return Ok(());
    }
    let result = consumer.commit(&to_tpl(positions), CommitMode::Sync);
    metrics.commit(result.is_ok());
    if result.is_ok() {
        tracker.committed(positions);
        tracing::debug!(positions = %fmt_positions(positions), "committed offsets");
    }
    result
}

/// The group refuses commits while a rebalance is under way; they succeed once this member
/// rejoined (which polling lets happen).
fn refused_by_rebalance(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::{IllegalGeneration, RebalanceInProgress};
    matches!(e, KafkaError::ConsumerCommit(IllegalGeneration | RebalanceInProgress))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_and_tls_refusals_are_named_and_other_errors_are_not() {
        use SecurityFailureKind::*;
        let tls = "sasl_ssl://b:9094/bootstrap: error:0A000086:SSL routines::certificate verify failed";
        let refused = "b:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: Connection refused";
        for (code, reason, want) in [
            (
                RDKafkaErrorCode::Authentication,
                "SASL authentication error",
                Some(Authentication),
            ),
            (RDKafkaErrorCode::SaslAuthenticationFailed, "", Some(Authentication)),
            (RDKafkaErrorCode::SSL, "", Some(Tls)),
            (RDKafkaErrorCode::BrokerTransportFailure, tls, Some(Tls)),
            (RDKafkaErrorCode::BrokerTransportFailure, refused, None),
            (RDKafkaErrorCode::AllBrokersDown, "1/1 brokers are down", None),
        ] {
            assert_eq!(SecurityFailureKind::classify(code, reason), want, "{code:?} {reason}");
        }
        assert!(Authentication.message().contains("sasl.password"));
        assert!(Tls.message().contains("ssl.ca.location"));
    }

    #[test]
    fn a_noted_failure_stays_the_cause_until_replaced_or_cleared() {
        let state = SourceState::default();
        assert!(state.security_failure().is_none());
        state.set_security_failure(Some(SecurityFailure {
            kind: SecurityFailureKind::Authentication,
            reason: "invalid credentials".into(),
        }));
        for _ in 0..2 {
            let f = state.security_failure().expect("noted");
            assert_eq!(f.kind, SecurityFailureKind::Authentication);
            assert_eq!(f.reason, "invalid credentials");
        }
        state.set_security_failure(None);
        assert!(state.security_failure().is_none());
    }

    fn context(state: &Arc<SourceState>) -> SourceContext {
        let (input, _) = mpsc::channel(1);
        SourceContext {
            log: KafkaLogContext::new(state.kafka.clone()),
            tracker: Arc::new(OffsetTracker::default()),
            input,
            state: state.clone(),
            metrics: Arc::new(Metrics::new()),
            drain_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_panic_in_a_callback_is_caught_and_becomes_a_fault_for_the_poll_thread() {
        let state = Arc::new(SourceState::default());
        let ctx = context(&state);
        ctx.guarded("rebalance", || panic!("bad partition list"));
        ctx.guarded("rebalance", || panic!("a second one"));
        assert_eq!(
            state.take_fault().as_deref(),
            Some("the Kafka rebalance callback panicked: bad partition list"),
            "the first fault is kept"
        );
        ctx.guarded("rebalance", || {});
        assert_eq!(state.take_fault(), None);
    }

    #[test]
    fn shutdown_deadlines_are_shared_with_the_callbacks() {
        let state = Arc::new(SourceState::default());
        assert_eq!(state.shutdown_deadline(), None, "no cap before shutdown");
        let now = Instant::now();
        let (drain, commit) = (now + Duration::from_secs(3), now + Duration::from_secs(4));
        state.begin_shutdown(drain, commit, &OffsetTracker::default());
        assert_eq!(state.shutdown_deadline(), Some(drain));
        assert_eq!(state.final_commit_deadline(), Some(commit));
    }
}
