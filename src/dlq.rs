//! Dead-letter topic: poison and exhausted records are written here with their original key,
//! value and headers plus `x-dlq-*` headers saying where they came from and why.
//!
//! A write counts only when the broker acknowledged it (idempotent producer, acks=all).
//! Failed writes are classified ([`WriteError`]) and counted
//! (`kafka_sidecar_dlq_errors_total{class}`):
//!
//! - **Too large** (the record plus the `x-dlq-*` headers exceeds the DLQ topic's
//!   `max.message.bytes` or the producer's `message.max.bytes`): the record is written again
//!   without its value, and if that is still too large without its key and original headers
//!   too, with `x-dlq-dropped` naming what was left out. The source coordinates stay, so the
//!   record can be replayed from the source topic. Counted in `dlq_values_dropped_total`.
//! - **Permanent** (unknown topic, authorization, invalid record, or too large even when
//!   stripped): the record cannot be written anywhere. It is kept unfinished (its lane is
//!   blocked, its offset never committed past) and retried with capped backoff; while any
//!   record is blocked so, [`DlqHealth`] is unhealthy: `/readyz` answers 503 and `/status`
//!   names the class and the fix. The cause is logged once (and again when it changes).
//! - **Transient** (broker unreachable, timeouts): retried with capped backoff.
//!
//! Nothing is ever skipped: a write ends only acknowledged or at shutdown's hard stop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RetryConfig};
use crate::kafka_client::{connection_config, KafkaLogContext};
use crate::metrics::{DlqErrorLabels, Metrics};
use crate::record::{native, Record};
use crate::retry::{Backoff, ErrorInfo};
use crate::retry_topics::{is_retry_header, Origin, RetryInfo, Tiers};

/// Header names added to dead-lettered records.
pub mod headers {
    pub const SOURCE_TOPIC: &str = "x-dlq-source-topic";
    pub const SOURCE_PARTITION: &str = "x-dlq-source-partition";
    pub const SOURCE_OFFSET: &str = "x-dlq-source-offset";
    pub const SOURCE_TIMESTAMP: &str = "x-dlq-source-timestamp";
    pub const CONSUMER_GROUP: &str = "x-dlq-consumer-group";
    pub const ATTEMPTS: &str = "x-dlq-attempts";
    pub const ERROR_CLASS: &str = "x-dlq-error-class";
    pub const ERROR_MESSAGE: &str = "x-dlq-error-message";
    /// What was left out because the dead letter was too large for the DLQ topic:
    /// `value`, or `value,key,headers`. Absent on a complete dead letter.
    pub const DROPPED: &str = "x-dlq-dropped";
}

/// The most of `x-dlq-error-message` a stripped dead letter keeps, in bytes.
const STRIPPED_MESSAGE_MAX: usize = 1024;

/// Why a write to the DLQ topic failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteError {
    /// The dead letter is larger than the topic or producer allows.
    TooLarge,
    /// The principal may not write to the topic (or could not authenticate).
    Authorization,
    /// The topic (or partition) does not exist.
    UnknownTopic,
    /// The topic refuses the record (e.g. a compacted topic and a record without key).
    InvalidRecord,
    /// Anything else: broker unreachable, timeouts, leader changes.
    Transient,
}

impl WriteError {
    /// Classifies a producer error.
    pub fn classify(e: &KafkaError) -> Self {
        use RDKafkaErrorCode as C;
        match e.rdkafka_error_code() {
            Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize) => Self::TooLarge,
            Some(C::TopicAuthorizationFailed | C::ClusterAuthorizationFailed | C::Authentication) => {
                Self::Authorization
            }
            Some(C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition) => Self::UnknownTopic,
            Some(C::InvalidRecord | C::PolicyViolation) => Self::InvalidRecord,
            _ => Self::Transient,
        }
    }

    /// The `class` label of `kafka_sidecar_dlq_errors_total` and `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "message_too_large",
            Self::Authorization => "authorization",
            Self::UnknownTopic => "unknown_topic",
            Self::InvalidRecord => "invalid_record",
            Self::Transient => "transient",
        }
    }

    /// What the operator has to do about it.
    pub fn fix(self, topic: &str) -> String {
        match self {
            Self::TooLarge => format!(
                "raise max.message.bytes of the DLQ topic {topic} (and message.max.bytes in [dlq.properties]): \
                 even without its value, key and headers the dead letter does not fit"
            ),
            Self::Authorization => format!(
                "grant the sidecar's principal WRITE and DESCRIBE on topic {topic} (and IDEMPOTENT_WRITE on \
                 the cluster for brokers before 2.8), or fix the credentials in [kafka.properties]/[dlq.properties]"
            ),
            Self::UnknownTopic => {
                format!("create the DLQ topic {topic}, or fix dlq.topic (for a retry tier topic: retry_topics.tiers)")
            }
            Self::InvalidRecord => format!(
                "the DLQ topic {topic} refuses the record (a compacted topic needs record keys): \
                 use a DLQ topic with cleanup.policy=delete"
            ),
            Self::Transient => "none: retried until the brokers answer".to_string(),
        }
    }
}

/// How much of the record a dead letter carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Key, value, original headers.
    Full,
    /// Key and original headers; no value.
    NoValue,
    /// Only the `x-dlq-*` headers (error message shortened) and the trace context.
    Stripped,
}

impl Shape {
    /// The smaller shape to try after a "too large".
    fn smaller(self) -> Option<Shape> {
        match self {
            Shape::Full => Some(Shape::NoValue),
            Shape::NoValue => Some(Shape::Stripped),
            Shape::Stripped => None,
        }
    }

    /// Value of the `x-dlq-dropped` header.
    fn dropped(self) -> Option<&'static str> {
        match self {
            Shape::Full => None,
            Shape::NoValue => Some("value"),
            Shape::Stripped => Some("value,key,headers"),
        }
    }
}

/// Whether dead-lettering works, shared with the admin server.
#[derive(Debug)]
pub struct DlqHealth {
    topic: String,
    state: Mutex<HealthState>,
    values_dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct HealthState {
    /// Records whose write is failing with a permanent error, by class.
    blocked: HashMap<WriteError, usize>,
    /// The class of the last permanent failure (what `/status` shows).
    last: Option<WriteError>,
    /// The topic of the last permanent failure: the DLQ topic or a retry tier topic.
    last_topic: Option<String>,
    /// Classes already logged since the last recovery (log once per cause).
    logged: Vec<WriteError>,
}

/// The current DLQ problem, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqStatus {
    pub topic: String,
    pub healthy: bool,
    pub error_class: Option<&'static str>,
    pub fix: Option<String>,
    pub blocked_records: usize,
    pub values_dropped: u64,
}

impl DlqHealth {
    pub fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_string(),
            state: Mutex::new(HealthState::default()),
            values_dropped: AtomicU64::new(0),
        }
    }

    /// False while a record cannot be dead-lettered because of a permanent error.
    pub fn healthy(&self) -> bool {
        self.lock().blocked.values().all(|n| *n == 0)
    }

    pub fn status(&self) -> DlqStatus {
        let state = self.lock();
        let blocked: usize = state.blocked.values().sum();
        let class = state.last.filter(|_| blocked > 0);
        DlqStatus {
            topic: self.topic.clone(),
            healthy: blocked == 0,
            error_class: class.map(WriteError::as_str),
            fix: class.map(|c| c.fix(state.last_topic.as_deref().unwrap_or(&self.topic))),
            blocked_records: blocked,
            values_dropped: self.values_dropped.load(Ordering::Relaxed),
        }
    }

    /// A record's write now fails with `class` (permanent); returns whether to log it.
    fn block(&self, class: WriteError, before: Option<WriteError>, topic: &str) -> bool {
        let mut state = self.lock();
        if state.last_topic.as_deref() != Some(topic) {
            state.last_topic = Some(topic.to_string());
        }
        if let Some(old) = before {
            if let Some(n) = state.blocked.get_mut(&old) {
                *n = n.saturating_sub(1);
            }
        }
        *state.blocked.entry(class).or_default() += 1;
        state.last = Some(class);
        if state.logged.contains(&class) {
            return false;
        }
        state.logged.push(class);
        true
    }

    /// A blocked record's write ended (written, or given up at shutdown); returns whether
    /// dead-lettering is healthy again because of it.
    fn unblock(&self, class: WriteError) -> bool {
        let mut state = self.lock();
        if let Some(n) = state.blocked.get_mut(&class) {
            *n = n.saturating_sub(1);
        }
        let healthy = state.blocked.values().all(|n| *n == 0);
        if healthy {
            state.logged.clear();
            state.last = None;
            state.last_topic = None;
        }
        healthy
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps [`DlqHealth`] counting a blocked record until its write ends, however it ends.
struct Blocked<'a> {
    health: &'a DlqHealth,
    class: Option<WriteError>,
}

impl Blocked<'_> {
    /// Records that the write now fails permanently with `class`; true when the cause is new.
    fn set(&mut self, class: WriteError, topic: &str) -> bool {
        if self.class == Some(class) {
            return false;
        }
        let log = self.health.block(class, self.class, topic);
        self.class = Some(class);
        log
    }

    /// The write succeeded; true when this made dead-lettering healthy again.
    fn written(mut self) -> bool {
        self.class.take().is_some_and(|c| self.health.unblock(c))
    }
}

impl Drop for Blocked<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.class.take() {
            self.health.unblock(c);
        }
    }
}

/// The dead-letter producer.
pub struct DeadLetters {
    producer: FutureProducer<KafkaLogContext>,
    topic: String,
    group: String,
    retry: RetryConfig,
    metrics: Arc<Metrics>,
    health: Arc<DlqHealth>,
    /// The retry tiers: a dead letter read from one names its original coordinates.
    tiers: Option<Arc<Tiers>>,
    /// Whether a record written without its value / stripped was logged already.
    warned_too_large: [AtomicBool; 2],
}

/// The write was given up because shutdown's grace period ran out.
#[derive(Debug)]
pub struct Interrupted;

/// Why a write to a retry tier ended without an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierWriteError {
    /// Shutdown's grace period ran out.
    Interrupted,
    /// The record is too large for the tier topic: dead-letter it instead.
    TooLarge,
}

/// Where a write goes.
enum Dest<'a> {
    Dlq {
        attempts: u32,
        error: &'a ErrorInfo,
    },
    Tier {
        topic: &'a str,
        headers: &'a [(&'static str, String)],
    },
}

impl<'a> Dest<'a> {
    fn topic(&self, dlq: &'a str) -> &'a str {
        match self {
            Dest::Dlq { .. } => dlq,
            Dest::Tier { topic, .. } => topic,
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Dest::Dlq { .. } => "dead-letter topic",
            Dest::Tier { .. } => "retry tier topic",
        }
    }
}

impl DeadLetters {
    /// Builds the producer; `None` when no DLQ topic is configured.
    pub fn from_config(cfg: &Config, metrics: Arc<Metrics>) -> anyhow::Result<Option<Self>> {
        if cfg.dlq.topic.is_empty() {
            return Ok(None);
        }
        let mut cc = connection_config(cfg, "-dlq");
        cc.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            // One dead letter per batch: a batch too large for the topic fails every record
            // in it, and only the too-large one should lose its value.
            .set("batch.num.messages", "1")
            .set("message.timeout.ms", "30000");
        for (k, v) in &cfg.dlq.properties {
            cc.set(k, v);
        }
        // Broker outages are reported once by the consumer's connectivity state, not per retry here.
        let producer: FutureProducer<KafkaLogContext> =
            cc.create_with_context(KafkaLogContext::quiet()).map_err(|e| {
                let e = crate::config::redact::kafka_error(&e, "dlq.properties");
                anyhow::anyhow!("failed to create the DLQ producer: {e}")
            })?;
        Ok(Some(Self {
            producer,
            topic: cfg.dlq.topic.clone(),
            group: cfg.kafka.group_id.clone(),
            retry: cfg.retry.clone(),
            metrics,
            health: Arc::new(DlqHealth::new(&cfg.dlq.topic)),
            tiers: Tiers::from_config(&cfg.retry_topics),
            warned_too_large: [AtomicBool::new(false), AtomicBool::new(false)],
        }))
    }

    /// The dead-letter topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether dead-lettering works (for `/readyz` and `/status`).
    pub fn health(&self) -> Arc<DlqHealth> {
        self.health.clone()
    }

    /// Writes a record to the DLQ, retrying until the broker acknowledges it (see the module
    /// docs for what happens to a record too large for the DLQ topic). Returns the dead
    /// letter's `(partition, offset)` in the DLQ topic.
    pub async fn send(
        &self,
        record: &Record,
        attempts: u32,
        error: &ErrorInfo,
        trace: &HashMap<String, String>,
        hard_stop: &CancellationToken,
    ) -> Result<(i32, i64), Interrupted> {
        let dest = Dest::Dlq { attempts, error };
        self.write(record, &dest, trace, hard_stop)
            .await
            .map_err(|_| Interrupted)
    }

    /// Writes a record to a retry tier topic with these `x-retry-*` headers (its original
    /// `x-retry-*` headers are replaced), retrying until the broker acknowledges it, with the
    /// same guarantees as [`Self::send`] except that a record too large for the tier topic is
    /// not shrunk (a tier record without its value could not be delivered): the caller
    /// dead-letters it instead ([`TierWriteError::TooLarge`]).
    pub async fn send_to_tier(
        &self,
        record: &Record,
        topic: &str,
        retry_headers: &[(&'static str, String)],
        trace: &HashMap<String, String>,
        hard_stop: &CancellationToken,
    ) -> Result<(), TierWriteError> {
        let dest = Dest::Tier {
            topic,
            headers: retry_headers,
        };
        self.write(record, &dest, trace, hard_stop).await.map(|_| ())
    }

    async fn write(
        &self,
        record: &Record,
        dest: &Dest<'_>,
        trace: &HashMap<String, String>,
        hard_stop: &CancellationToken,
    ) -> Result<(i32, i64), TierWriteError> {
        let topic = dest.topic(&self.topic);
        let mut shape = Shape::Full;
        let mut blocked = Blocked {
            health: &self.health,
            class: None,
        };
        let mut backoff = Backoff::from_config(&self.retry);
        let mut transient_failures = 0u32;
        loop {
            let headers = match dest {
                Dest::Dlq { attempts, error } => self.headers(record, *attempts, error, trace, shape),
                Dest::Tier { headers, .. } => tier_headers(record, headers, trace),
            };
            let mut out = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
            if let (Some(k), Shape::Full | Shape::NoValue) = (&record.key, shape) {
                out = out.key(k.as_ref());
            }
            if let (Some(v), Shape::Full) = (&record.value, shape) {
                out = out.payload(v.as_ref());
            }
            let sent = tokio::select! {
                r = self.producer.send(out, Timeout::After(Duration::from_secs(30))) => r,
                _ = hard_stop.cancelled() => return Err(TierWriteError::Interrupted),
            };
            let e = match sent {
                Ok(delivery) => {
                    self.written(record, shape, blocked);
                    return Ok((delivery.partition, delivery.offset));
                }
                Err((e, _)) => e,
            };
            let class = WriteError::classify(&e);
            self.metrics
                .dlq_errors
                .get_or_create(&DlqErrorLabels {
                    class: class.as_str().to_string(),
                })
                .inc();
            if let (WriteError::TooLarge, Dest::Tier { .. }) = (class, dest) {
                return Err(TierWriteError::TooLarge);
            }
            // A record without a value (tombstone) has nothing to drop but its key and headers.
            let smaller = match shape.smaller() {
                Some(Shape::NoValue) if record.value.is_none() => Some(Shape::Stripped),
                next => next,
            };
            if let (WriteError::TooLarge, Some(smaller)) = (class, smaller) {
                self.log_too_large(record, smaller, &e);
                shape = smaller;
                continue;
            }
            let delay = backoff.next_delay();
            if class == WriteError::Transient {
                transient_failures += 1;
                if transient_failures == 1 || transient_failures % 20 == 0 {
                    tracing::warn!(
                        dlq_topic = %topic, topic = %record.topic, partition = record.partition,
                        offset = record.offset, error = %e, failures = transient_failures, retry_in = ?delay,
                        "failed to write a record to the {}; retrying (the record stays unfinished)", dest.what()
                    );
                }
            } else if blocked.set(class, topic) {
                tracing::error!(
                    dlq_topic = %topic, topic = %record.topic, partition = record.partition,
                    offset = record.offset, error = %e, error_class = class.as_str(), fix = %class.fix(topic),
                    "cannot write to the {}; the record is kept (its lane is blocked and its \
                     offset not committed) and retried with backoff; not ready until a write succeeds", dest.what()
                );
            }
            self.metrics.dlq_blocked_records.set(self.blocked_gauge());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = hard_stop.cancelled() => return Err(TierWriteError::Interrupted),
            }
        }
    }

    /// Bookkeeping after an acknowledged write.
    fn written(&self, record: &Record, shape: Shape, blocked: Blocked<'_>) {
        if shape != Shape::Full {
            self.health.values_dropped.fetch_add(1, Ordering::Relaxed);
            self.metrics.dlq_values_dropped.inc();
        }
        if blocked.written() {
            tracing::info!(dlq_topic = %self.topic, topic = %record.topic, partition = record.partition,
                offset = record.offset, "dead-letter writes succeed again");
        }
        self.metrics.dlq_blocked_records.set(self.blocked_gauge());
    }

    fn blocked_gauge(&self) -> i64 {
        i64::try_from(self.health.status().blocked_records).unwrap_or(i64::MAX)
    }

    /// Logs the first record dead-lettered in each smaller shape with the fix; later ones at debug.
    fn log_too_large(&self, record: &Record, smaller: Shape, e: &KafkaError) {
        let first = !self.warned_too_large[usize::from(smaller == Shape::Stripped)].swap(true, Ordering::Relaxed);
        let dropped = smaller.dropped().unwrap_or_default();
        if first {
            tracing::warn!(
                dlq_topic = %self.topic, topic = %record.topic, partition = record.partition, offset = record.offset,
                error = %e, dropped,
                fix = "raise max.message.bytes of the DLQ topic (and message.max.bytes in [dlq.properties]) \
                       above the largest source record plus about 1 KiB of x-dlq headers",
                "record too large for the dead-letter topic; writing it without its {dropped} \
                 (header x-dlq-dropped; replay it from its source topic, partition and offset). Logged once"
            );
        } else {
            tracing::debug!(topic = %record.topic, partition = record.partition, offset = record.offset, dropped,
                "record too large for the dead-letter topic; writing it without its {dropped}");
        }
    }

    fn headers(
        &self,
        r: &Record,
        attempts: u32,
        error: &ErrorInfo,
        trace: &HashMap<String, String>,
        shape: Shape,
    ) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(r.headers.len() + 9);
        let original = if shape == Shape::Stripped {
            &[][..]
        } else {
            &r.headers[..]
        };
        // Original headers, byte for byte (names need not be UTF-8), except a trace context
        // replaced by the delivery span's.
        let replaced = |name: &[u8]| std::str::from_utf8(name).is_ok_and(|n| trace.contains_key(n));
        for (name, value) in original.iter().filter(|(name, _)| !replaced(name)) {
            h = native::add(h, name, value.as_deref());
        }
        for (name, value) in trace {
            h = h.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        // A record read from a retry tier is dead-lettered under its original coordinates (its
        // `x-retry-*` headers, kept above, carry its history).
        let origin = match self.tiers.as_ref().and_then(|t| t.index_of(&r.topic)) {
            Some(tier) => RetryInfo::read(r, tier).origin,
            None => Origin::of(r),
        };
        let ts = origin.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
        let message = match shape {
            Shape::Stripped => truncate(&error.message, STRIPPED_MESSAGE_MAX).to_string(),
            _ => error.message.clone(),
        };
        let fields = [
            (headers::SOURCE_TOPIC, origin.topic),
            (headers::SOURCE_PARTITION, origin.partition.to_string()),
            (headers::SOURCE_OFFSET, origin.offset.to_string()),
            (headers::SOURCE_TIMESTAMP, ts),
            (headers::CONSUMER_GROUP, self.group.clone()),
            (headers::ATTEMPTS, attempts.to_string()),
            (headers::ERROR_CLASS, error.class.clone()),
            (headers::ERROR_MESSAGE, message),
        ];
        for (key, value) in &fields {
            h = h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        if let Some(dropped) = shape.dropped() {
            h = h.insert(Header {
                key: headers::DROPPED,
                value: Some(dropped.as_bytes()),
            });
        }
        h
    }

    /// Waits for queued writes to be acknowledged (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "DLQ producer did not flush in time");
        }
    }
}

/// The headers of a record written to a retry tier: its original headers byte for byte except
/// its old `x-retry-*` headers and a trace context (replaced by the delivery span's), then
/// the trace context and the new `x-retry-*` headers.
fn tier_headers(r: &Record, retry_headers: &[(&'static str, String)], trace: &HashMap<String, String>) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(r.headers.len() + retry_headers.len() + 2);
    let replaced =
        |name: &[u8]| is_retry_header(name) || std::str::from_utf8(name).is_ok_and(|n| trace.contains_key(n));
    for (name, value) in r.headers.iter().filter(|(name, _)| !replaced(name)) {
        h = native::add(h, name, value.as_deref());
    }
    for (name, value) in trace {
        h = h.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    for (key, value) in retry_headers {
        h = h.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    h
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce_error(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn producer_errors_are_classified() {
        use RDKafkaErrorCode as C;
        let cases = [
            (C::MessageSizeTooLarge, "message_too_large"),
            (C::MessageBatchTooLarge, "message_too_large"),
            (C::TopicAuthorizationFailed, "authorization"),
            (C::ClusterAuthorizationFailed, "authorization"),
            (C::UnknownTopicOrPartition, "unknown_topic"),
            (C::UnknownTopic, "unknown_topic"),
            (C::UnknownPartition, "unknown_topic"),
            (C::InvalidRecord, "invalid_record"),
            (C::MessageTimedOut, "transient"),
            (C::NotLeaderForPartition, "transient"),
            (C::AllBrokersDown, "transient"),
        ];
        for (code, class) in cases {
            assert_eq!(WriteError::classify(&produce_error(code)).as_str(), class, "{code:?}");
        }
        assert!(WriteError::UnknownTopic
            .fix("dead")
            .contains("create the DLQ topic dead"));
    }

    #[test]
    fn health_counts_blocked_records_per_cause_and_logs_each_cause_once() {
        let health = DlqHealth::new("dlq");
        assert!(health.healthy());
        let mut a = Blocked {
            health: &health,
            class: None,
        };
        let mut b = Blocked {
            health: &health,
            class: None,
        };
        assert!(a.set(WriteError::UnknownTopic, "dlq"), "a new cause is logged");
        assert!(!a.set(WriteError::UnknownTopic, "dlq"));
        assert!(
            !b.set(WriteError::UnknownTopic, "dlq"),
            "the same cause for another record is not"
        );
        let status = health.status();
        assert!(!status.healthy);
        assert_eq!(status.error_class, Some("unknown_topic"));
        assert_eq!(status.blocked_records, 2);
        assert!(status.fix.is_some_and(|f| f.contains("create the DLQ topic dlq")));
        assert!(b.set(WriteError::Authorization, "dlq"), "a changed cause is logged");
        assert_eq!(health.status().blocked_records, 2);
        assert!(!a.written(), "b is still blocked");
        drop(b);
        let status = health.status();
        assert!(status.healthy, "a write given up at shutdown unblocks too");
        assert_eq!((status.error_class, status.blocked_records), (None, 0));
        let mut c = Blocked {
            health: &health,
            class: None,
        };
        assert!(
            c.set(WriteError::UnknownTopic, "dlq"),
            "after a recovery a cause is logged again"
        );
    }

    #[test]
    fn shapes_shrink_value_first_then_key_and_headers() {
        assert_eq!(Shape::Full.dropped(), None);
        assert_eq!(Shape::Full.smaller(), Some(Shape::NoValue));
        assert_eq!(Shape::NoValue.dropped(), Some("value"));
        assert_eq!(Shape::NoValue.smaller(), Some(Shape::Stripped));
        assert_eq!(Shape::Stripped.dropped(), Some("value,key,headers"));
        assert_eq!(Shape::Stripped.smaller(), None);
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
