//! Worker: runs one job (one record, or one batch) to the end.
//!
//! Each attempt goes through three stages, one file each:
//! - [`admit`]: drop the records of revoked partitions, claim the idempotency keys (dedup),
//!   wait for the circuit breaker and the rate limiter;
//! - [`deliver`]: one request to the app;
//! - [`settle`]: classify each answer, then finish the record (2xx), dead-letter it (poison
//!   or retries exhausted), or wait and try again.
//!
//!  A job ends only when every record in it is
//! finished, its partition was revoked, or shutdown's grace period ran out: a record is
//! never dropped to make progress. With no DLQ configured, an exhausted record keeps being
//! retried at the maximum backoff and blocks its lane.
//!
//! With dedup on, every attempt first claims the records' idempotency keys (one round trip
//! for the job; a retry refreshes the lease): a done key finishes its record as
//! `deduplicated`, a key held elsewhere makes its record wait, and the keys of delivered or
//! dead-lettered records are marked done before their offsets can be committed.
//!
//! A job that panics (a bug, on whatever input) is caught by the scheduler and handed to
//! [`JobRunner::after_panic`]: the record is run again with backoff, and once it has panicked
//! `retry.max_attempts` times it is dead-lettered with error class `panic` (without a DLQ it
//! is run again at the maximum backoff and blocks its lane, like any record that cannot be
//! delivered). Every panic is counted in `job_panics_total`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::breaker::Breaker;
use crate::config::RetryConfig;
use crate::dedup::{derive_key, Gate, KeySource};
use crate::delivery::{AppClient, Outgoing};
use crate::dlq::DeadLetters;
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::pipeline::JobRunner;
use crate::ratelimit::RateLimiter;
use crate::record::Record;
use crate::retry::{Backoff, ErrorInfo};
use crate::retry_topics::{Failure, RetryInfo, Tiers};
use crate::telemetry::DeliverySpan;

mod admit;
mod deliver;
mod settle;

use admit::ClaimWait;

/// Everything a job needs; shared by all jobs.
pub struct Worker {
    pub app: AppClient,
    pub dlq: Option<DeadLetters>,
    pub tracker: Arc<OffsetTracker>,
    pub retry: RetryConfig,
    pub metrics: Arc<Metrics>,
    /// Circuit breaker on the app.
    pub breaker: Arc<Breaker>,
    /// Rate limits and adaptive concurrency.
    pub limiter: RateLimiter,
    /// Consumer group, for span attributes.
    pub group: String,
    /// Fired when the shutdown grace period is over: abandon unfinished work (it is not committed).
    pub hard_stop: CancellationToken,
    /// Dedup by idempotency key; `None` when `dedup.enabled` is off.
    pub dedup: Option<Gate>,
    /// Where idempotency keys come from (`dedup.key`); sent to the app even with dedup off.
    pub key_source: KeySource,
    /// Retry tiers (`retry_topics`); `None` when off.
    pub tiers: Option<Arc<Tiers>>,
}

/// A record still being worked on, with the failed attempts it has used.
struct Open<'a> {
    record: &'a Record,
    failures: u32,
    exhausted_logged: bool,
    span: DeliverySpan,
    /// `traceparent`/`tracestate` of the delivery span, passed to the app and the DLQ.
    trace: HashMap<String, String>,
    /// Idempotency key, sent as `Idempotency-Key` and claimed when dedup is on.
    key: String,
    /// Whether this attempt delivers it (false: it waits for its idempotency key).
    ready: bool,
    /// What a record read from a retry tier says about its earlier attempts. Boxed, like
    /// `first_failure`: both are rare, and an `Open` is moved several times per attempt (a
    /// batch moves 500 of them), so it is kept small (128 bytes instead of 304).
    retry: Option<Box<RetryInfo>>,
    /// The first failure of this record (from a tier's headers, or of this pass).
    first_failure: Option<Box<Failure>>,
}

impl Open<'_> {
    /// Attempts made before this record was read (from a retry tier).
    fn prior_attempts(&self) -> u32 {
        self.retry.as_ref().map_or(0, |r| r.prior_attempts)
    }
}

/// A record done with delivery (delivered, dead-lettered, or moved to a retry tier), to
/// finish after its key is marked done (released, for a record moved to a tier: its next
/// delivery must not be taken for a duplicate).
struct Settled<'a> {
    open: Open<'a>,
    outcome: &'static str,
    error: Option<String>,
}

/// The job stopped early: shutdown's hard stop.
struct Stopped;

impl JobRunner for Worker {
    fn run(&self, job: &[Record]) -> impl Future<Output = ()> + Send {
        self.deliver(job)
    }

    fn after_panic(&self, job: &[Record], panics: u32, message: &str) -> impl Future<Output = bool> + Send {
        self.handle_panic(job, panics, message)
    }
}

impl Worker {
    /// Delivers a job; returns when every record is finished or abandoned.
    pub async fn deliver(&self, job: &[Record]) {
        let mut open: Vec<Open<'_>> = job.iter().map(|record| self.open(record)).collect();
        // Log lines of this job carry the (first) record's coordinates, trace id and delivery span
        // id (`trace_id`/`span_id`, top-level fields of JSON lines: see `logging`).
        // Without a trace the span has no id fields (nothing formatted per job for them).
        let first = &job[0];
        let log_span = match open[0].span.log_ids() {
            Some((trace_id, span_id)) => tracing::info_span!(
                "delivery",
                topic = %first.topic,
                partition = first.partition,
                offset = first.offset,
                records = job.len(),
                trace_id = %trace_id,
                span_id = %span_id,
            ),
            None => tracing::info_span!(
                "delivery",
                topic = %first.topic,
                partition = first.partition,
                offset = first.offset,
                records = job.len(),
            ),
        };
        if self.run_inner(&mut open).instrument(log_span).await.is_err() {
            for o in open {
                o.span.end("abandoned", 0, Some("shutdown grace period over"));
            }
        }
    }

    fn open<'a>(&self, record: &'a Record) -> Open<'a> {
        let span = DeliverySpan::start(record, &self.group);
        let retry = self
            .tiers
            .as_ref()
            .and_then(|t| t.index_of(&record.topic))
            .map(|tier| Box::new(RetryInfo::read(record, tier)));
        // A record from a tier keeps the idempotency key of its original coordinates.
        let key = match &retry {
            Some(info) => derive_key(
                &self.key_source,
                &Record {
                    topic: info.origin.topic.as_str().into(),
                    partition: info.origin.partition,
                    offset: info.origin.offset,
                    ..record.clone()
                },
            ),
            None => derive_key(&self.key_source, record),
        };
        if key.fallback && self.dedup.is_some() {
            self.metrics.dedup_key_fallbacks.inc();
        }
        Open {
            record,
            failures: 0,
            exhausted_logged: false,
            trace: span.headers(),
            span,
            key: key.key,
            ready: true,
            first_failure: retry.as_ref().and_then(|r| r.first.clone()).map(Box::new),
            retry,
        }
    }

    /// See [`JobRunner::after_panic`]: run a record again with backoff, dead-letter it with
    /// error class `panic` after `retry.max_attempts` panics. A job of several records is run
    /// again at once, one record at a time (the scheduler splits it).
    async fn handle_panic(&self, job: &[Record], panics: u32, message: &str) -> bool {
        self.metrics.job_panics.inc();
        let first = &job[0];
        if job.len() > 1 {
            tracing::error!(
                topic = %first.topic, partition = first.partition, offset = first.offset,
                records = job.len(), panic = %message,
                "delivery job panicked; running its records again one at a time"
            );
            return !self.hard_stop.is_cancelled();
        }
        if self.hard_stop.is_cancelled() {
            // Abandoned: not committed, read again after the restart.
            return false;
        }
        if !self.tracker.is_unfinished(&tp(first), first.offset, first.generation) {
            // Finished before the panic, or revoked: nothing to redo. A claim the panicked run
            // may have taken must not keep other records with this key waiting.
            if let Some(gate) = &self.dedup {
                let key = derive_key(&self.key_source, first).key;
                gate.release(&[(first, key.as_str())]).await;
            }
            return false;
        }
        let attempts = panics.min(self.retry.max_attempts);
        // Every panic is counted; a record that keeps panicking without a DLQ is logged sparingly.
        if panics <= self.retry.max_attempts || panics % 20 == 0 {
            tracing::error!(
                topic = %first.topic, partition = first.partition, offset = first.offset,
                panics, max_attempts = self.retry.max_attempts, panic = %message,
                "delivery of a record panicked"
            );
        }
        if panics < self.retry.max_attempts {
            // The same growing backoff as failed deliveries.
            let mut backoff = Backoff::from_config(&self.retry);
            let mut delay = backoff.next_delay();
            for _ in 1..panics {
                delay = backoff.next_delay();
            }
            return self.sleep(delay).await.is_ok();
        }
        let Some(dlq) = &self.dlq else {
            if panics == self.retry.max_attempts {
                tracing::error!(
                    topic = %first.topic, partition = first.partition, offset = first.offset,
                    "record keeps panicking and no dead-letter topic is configured; \
                     it blocks its lane and is run again at the maximum backoff"
                );
            }
            return self.sleep(self.retry.max_backoff).await.is_ok();
        };
        let error = ErrorInfo::new("panic", format!("delivery panicked {panics} times: {message}"));
        if let Ok(settled) = self.dead_letter(dlq, self.open(first), attempts, &error).await {
            // Err: shutdown's hard stop came first; the record is not committed.
            let _ = self.settle(vec![settled], attempts).await;
        }
        false
    }

    /// The job's attempts, each through the stages in order: admit (the records still ours,
    /// their keys claimed, the breaker and rate limiter passed), deliver (the request), settle
    /// (each record delivered, dead-lettered, or kept for the next attempt after a wait).
    async fn run_inner<'a>(&self, open: &mut Vec<Open<'a>>) -> Result<(), Stopped> {
        let mut backoff = Backoff::from_config(&self.retry);
        let mut claim_wait = ClaimWait::new(&self.retry);
        let mut attempt = 0u32;
        loop {
            // Admit: which records go out now.
            self.drop_revoked(open, attempt).await;
            self.claim_keys(open, attempt, &mut claim_wait).await;
            if open.is_empty() {
                return Ok(());
            }
            let mut sending = admit::take_ready(open, |o| o.ready);
            if sending.is_empty() {
                self.sleep(claim_wait.delay()).await?;
                continue;
            }
            if let Some(error) = self.refusal(&sending) {
                self.refuse(open, sending, attempt, error).await?;
                continue;
            }
            attempt += 1;
            // Admit: the breaker and the rate limiter. Deliver: the request.
            let reply = match self.pass_gates(&sending).await {
                Ok(pass) => self.send(&sending, attempt, pass).await,
                Err(stopped) => Err(stopped),
            };
            let Ok(reply) = reply else {
                open.append(&mut sending);
                return Err(Stopped);
            };
            // Settle.
            let next = self.settle_reply(open, sending, &reply, attempt).await?;
            if open.is_empty() {
                return Ok(());
            }
            let delay = settle::retry_delay(&next, &mut backoff, self.retry.max_backoff);
            if let (Some(error), true) = (&next.outage, attempt == 1 || attempt % 20 == 0) {
                tracing::warn!(error = %error.message, retry_in = ?delay, "app unreachable; holding records until it is back (nothing is dead-lettered)");
            }
            self.sleep(delay).await?;
        }
    }

    async fn sleep(&self, delay: Duration) -> Result<(), Stopped> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.hard_stop.cancelled() => Err(Stopped),
        }
    }
}

/// What to send for each record.
fn outgoing<'o>(open: &'o [Open<'_>]) -> Vec<Outgoing<'o>> {
    open.iter()
        .map(|o| Outgoing {
            record: o.record,
            trace: &o.trace,
            idempotency_key: &o.key,
            retry: o.retry.as_deref(),
        })
        .collect()
}

/// `(record, idempotency key)` of each record, for the dedup gate.
fn keys<'o>(open: &'o [Open<'_>]) -> Vec<(&'o Record, &'o str)> {
    open.iter().map(|o| (o.record, o.key.as_str())).collect()
}

fn tp(r: &Record) -> TopicPartition {
    TopicPartition {
        topic: r.topic.clone(),
        partition: r.partition,
    }
}
