//! Worker: runs one job (one record, or one batch) to the end.
//!
//! Deliver, classify each answer, then finish the record (2xx), dead-letter it (poison or
//! retries exhausted), or wait and try again. A job ends only when every record in it is
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

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::breaker::{counts_as_failure, Admission, Breaker, BreakerState};
use crate::config::RetryConfig;
use crate::dedup::{derive_key, Decision, Gate, KeySource, OnError};
use crate::delivery::{AppClient, Outgoing};
use crate::dlq::DeadLetters;
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::pipeline::JobRunner;
use crate::ratelimit::{Permit, RateLimiter};
use crate::record::Record;
use crate::retry::{classify, Backoff, ErrorInfo, Transport, Verdict};
use crate::telemetry::DeliverySpan;

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
}

/// A record done with delivery (delivered or dead-lettered), to finish after its key is marked done.
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
        // Log lines of this job carry the (first) record's coordinates and trace id.
        let first = &job[0];
        let log_span = tracing::info_span!(
            "delivery",
            topic = %first.topic,
            partition = first.partition,
            offset = first.offset,
            records = job.len(),
            trace_id = %open[0].span.trace_id(),
        );
        if self.run_inner(&mut open).instrument(log_span).await.is_err() {
            for o in open {
                o.span.end("abandoned", 0, Some("shutdown grace period over"));
            }
        }
    }

    fn open<'a>(&self, record: &'a Record) -> Open<'a> {
        let span = DeliverySpan::start(record, &self.group);
        let key = derive_key(&self.key_source, record);
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

    async fn run_inner<'a>(&self, open: &mut Vec<Open<'a>>) -> Result<(), Stopped> {
        let mut backoff = Backoff::from_config(&self.retry);
        // Waiting for a key held elsewhere, or for the dedup store to answer.
        let mut key_backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut store_backoff = Backoff::from_config(&self.retry);
        let mut store_failures = 0u32;
        let mut attempt = 0u32;
        loop {
            // Work of a revoked partition belongs to its new owner now.
            let (current, revoked): (Vec<_>, Vec<_>) = std::mem::take(open)
                .into_iter()
                .partition(|o| self.tracker.is_current(&tp(o.record), o.record.generation));
            *open = current;
            if let Some(gate) = &self.dedup {
                gate.release(&keys(&revoked)).await;
            }
            for o in revoked {
                o.span.end("revoked", attempt, None);
            }
            if let Some(gate) = &self.dedup {
                match gate.claim(&keys(open)).await {
                    Ok(decisions) => {
                        store_failures = 0;
                        store_backoff.reset();
                        let mut kept = Vec::with_capacity(open.len());
                        for (mut o, decision) in std::mem::take(open).into_iter().zip(decisions) {
                            match decision {
                                Decision::Duplicate => self.finish(o, attempt, "deduplicated", None),
                                d => {
                                    o.ready = d == Decision::Deliver;
                                    kept.push(o);
                                }
                            }
                        }
                        *open = kept;
                    }
                    Err(e) if gate.on_error() == OnError::Deliver => {
                        tracing::warn!(error = %e, records = open.len(), "dedup store unavailable; delivering without dedup (dedup.on_error = \"deliver\")");
                        self.metrics.dedup_bypassed.inc_by(open.len() as u64);
                        open.iter_mut().for_each(|o| o.ready = true);
                    }
                    Err(e) => {
                        store_failures += 1;
                        if store_failures == 1 || store_failures % 20 == 0 {
                            tracing::warn!(error = %e, store = gate.target(), failures = store_failures, "dedup store unavailable; holding records until it answers (dedup.on_error = \"pause\")");
                        }
                        open.iter_mut().for_each(|o| o.ready = false);
                    }
                }
            }
            if open.is_empty() {
                return Ok(());
            }
            let (mut sending, waiting): (Vec<_>, Vec<_>) = std::mem::take(open).into_iter().partition(|o| o.ready);
            *open = waiting;
            if sending.is_empty() {
                let delay = if store_failures > 0 {
                    store_backoff.next_delay().max(Duration::from_millis(50))
                } else {
                    key_backoff.next_delay()
                };
                self.sleep(delay).await?;
                continue;
            }
            // A request that can never be sent (single mode: metadata headers over
            // app.max_header_bytes) is the record's fault; the app is not called.
            let refusal = self.app.refusal(&outgoing(&sending));
            if let Some(error) = refusal {
                self.refuse(open, sending, attempt, error).await?;
                continue;
            }
            attempt += 1;
            let records: Vec<Outgoing<'_>> = sending
                .iter()
                .map(|o| Outgoing {
                    record: o.record,
                    trace: &o.trace,
                    idempotency_key: &o.key,
                })
                .collect();
            // One key for the per-key rate limit; a batch of mixed keys is limited globally only.
            let key = match sending.as_slice() {
                [only] => only.record.key.as_deref(),
                _ => None,
            };
            let gate_started = Instant::now();
            let (admission, permit) = tokio::select! {
                g = self.admit(key, sending.len() as u32) => g,
                _ = self.hard_stop.cancelled() => {
                    open.append(&mut sending);
                    return Err(Stopped);
                }
            };
            self.metrics
                .rate_limit_wait_seconds
                .inc_by(gate_started.elapsed().as_secs_f64());
            self.metrics.batch_size.observe(sending.len() as f64);
            let started = Instant::now();
            let reply = tokio::select! {
                r = self.app.send(&records, attempt) => r,
                _ = self.hard_stop.cancelled() => {
                    drop(records);
                    open.append(&mut sending);
                    return Err(Stopped);
                }
            };
            drop(records);
            self.metrics.observe_delivery(started.elapsed(), &reply.transport);
            self.breaker.record(counts_as_failure(&reply.transport));
            self.limiter.on_result(&reply.transport);
            drop((admission, permit));
            self.metrics.breaker_state.set(self.breaker.state().as_gauge());
            self.metrics.concurrency_limit.set(self.limiter.current_limit() as i64);
            // While the breaker is not closed the app is having an outage: failures then do not
            // use up a record's attempts (nothing is dead-lettered because the app is down).
            let counting = self.breaker.state() == BreakerState::Closed;
            let verdicts: Vec<Verdict> = match &reply.per_record {
                Some(statuses) => statuses
                    .iter()
                    .map(|&status| {
                        classify(
                            &Transport::Status {
                                status,
                                retry_after: None,
                            },
                            &self.retry.non_retryable_statuses,
                        )
                    })
                    .collect(),
                None => {
                    vec![classify(&reply.transport, &self.retry.non_retryable_statuses); sending.len()]
                }
            };
            let mut still_open = Vec::new();
            let mut settled = Vec::new();
            let mut wait: Option<Duration> = None;
            let mut outage = None;
            for (mut o, verdict) in sending.into_iter().zip(verdicts) {
                let verdict = match verdict {
                    Verdict::Retry(error, after) if !counting => Verdict::Busy(error, after),
                    v => v,
                };
                match (verdict, self.dlq.as_ref()) {
                    (Verdict::Success, _) => settled.push(Settled {
                        open: o,
                        outcome: "delivered",
                        error: None,
                    }),
                    (Verdict::Poison(error), Some(dlq)) => {
                        settled.push(self.dead_letter(dlq, o, attempt, &error).await?)
                    }
                    (Verdict::Retry(_, after), _) if o.failures + 1 < self.retry.max_attempts => {
                        o.failures += 1;
                        self.metrics.record_outcome(o.record, "retried");
                        wait = wait.max(after);
                        still_open.push(o);
                    }
                    (Verdict::Retry(error, _), Some(dlq)) => {
                        o.failures += 1;
                        let error = ErrorInfo::new(
                            error.class,
                            format!("{} (gave up after {} attempts)", error.message, o.failures),
                        );
                        settled.push(self.dead_letter(dlq, o, attempt, &error).await?);
                    }
                    (Verdict::Poison(error) | Verdict::Retry(error, _), None) => {
                        // Nowhere safe to put it: keep trying slowly, blocking only its lane.
                        o.failures += 1;
                        if !o.exhausted_logged {
                            o.exhausted_logged = true;
                            tracing::error!(
                                topic = %o.record.topic, partition = o.record.partition, offset = o.record.offset,
                                error = %error.message, attempts = o.failures,
                                "record cannot be delivered and no dead-letter topic is configured; \
                                 it blocks its lane and is retried until the app accepts it"
                            );
                        }
                        wait = Some(self.retry.max_backoff);
                        still_open.push(o);
                    }
                    (Verdict::Busy(_, after), _) => {
                        self.metrics.record_outcome(o.record, "retried");
                        wait = wait.max(after);
                        still_open.push(o);
                    }
                    (Verdict::Outage(error), _) => {
                        outage = Some(error);
                        still_open.push(o);
                    }
                }
            }
            open.append(&mut still_open);
            self.settle(settled, attempt).await?;
            if open.is_empty() {
                return Ok(());
            }
            let delay = match outage {
                Some(error) => {
                    let delay = backoff.next_delay().max(Duration::from_millis(50));
                    if attempt == 1 || attempt % 20 == 0 {
                        tracing::warn!(error = %error.message, retry_in = ?delay, "app unreachable; holding records until it is back (nothing is dead-lettered)");
                    }
                    delay
                }
                None => wait.map_or_else(|| backoff.next_delay(), |w| w.min(self.retry.max_backoff)),
            };
            self.sleep(delay).await?;
        }
    }

    async fn sleep(&self, delay: Duration) -> Result<(), Stopped> {
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.hard_stop.cancelled() => Err(Stopped),
        }
    }

    /// Marks the keys of delivered and dead-lettered records done (one round trip), then
    /// finishes the records, so that no offset is committed before its key is done. With
    /// `dedup.on_error = "pause"` a failing store is retried until it answers.
    async fn settle(&self, settled: Vec<Settled<'_>>, attempts: u32) -> Result<(), Stopped> {
        if let (Some(gate), false) = (&self.dedup, settled.is_empty()) {
            let items: Vec<(&Record, &str)> = settled.iter().map(|s| (s.open.record, s.open.key.as_str())).collect();
            let mut backoff = Backoff::from_config(&self.retry);
            let mut failures = 0u32;
            loop {
                match gate.done(&items).await {
                    Ok(()) => break,
                    Err(e) if gate.on_error() == OnError::Deliver => {
                        tracing::warn!(error = %e, records = items.len(), "could not mark records done in the dedup store; a redelivery of them would not be caught");
                        gate.forget(&items);
                        break;
                    }
                    Err(e) => {
                        failures += 1;
                        if failures == 1 || failures % 20 == 0 {
                            tracing::warn!(error = %e, store = gate.target(), failures, "dedup store unavailable; records delivered but not yet marked done wait for it (their offsets are not committed)");
                        }
                        if self
                            .sleep(backoff.next_delay().max(Duration::from_millis(50)))
                            .await
                            .is_err()
                        {
                            drop(items);
                            for s in settled {
                                s.open
                                    .span
                                    .end("abandoned", attempts, Some("shutdown grace period over"));
                            }
                            return Err(Stopped);
                        }
                    }
                }
            }
        }
        for s in settled {
            self.finish(s.open, attempts, s.outcome, s.error.as_deref());
        }
        Ok(())
    }

    /// Waits until the breaker admits a request and the rate limiter grants a slot.
    async fn admit(&self, key: Option<&[u8]>, n: u32) -> (Admission<'_>, Permit) {
        let admission = self.breaker.wait_until_allowed().await;
        let permit = self.limiter.acquire(key, n).await;
        (admission, permit)
    }

    fn finish(&self, o: Open<'_>, attempts: u32, outcome: &'static str, error: Option<&str>) {
        let record = o.record;
        if self.tracker.finish(&tp(record), record.offset, record.generation) {
            self.metrics.record_finished(record, outcome);
        }
        o.span.end(outcome, attempts, error);
    }

    /// Records that cannot be sent at all: dead-lettered with `error`, or without a DLQ kept
    /// in their lane (checked again every `retry.max_backoff`, like other poison). Counted
    /// once per record as `records_total{outcome=<error class>}`.
    async fn refuse<'a>(
        &self,
        open: &mut Vec<Open<'a>>,
        sending: Vec<Open<'a>>,
        attempts: u32,
        error: ErrorInfo,
    ) -> Result<(), Stopped> {
        let mut settled = Vec::new();
        let mut held = false;
        for mut o in sending {
            if !o.exhausted_logged {
                self.metrics.record_outcome(o.record, &error.class);
            }
            match &self.dlq {
                Some(dlq) => settled.push(self.dead_letter(dlq, o, attempts, &error).await?),
                None => {
                    if !o.exhausted_logged {
                        tracing::error!(
                            topic = %o.record.topic, partition = o.record.partition, offset = o.record.offset,
                            error_class = %error.class, error = %error.message,
                            "record cannot be sent and no dead-letter topic is configured; it blocks its lane"
                        );
                    }
                    o.exhausted_logged = true;
                    held = true;
                    open.push(o);
                }
            }
        }
        self.settle(settled, attempts).await?;
        if held {
            self.sleep(self.retry.max_backoff).await?;
        }
        Ok(())
    }

    async fn dead_letter<'a>(
        &self,
        dlq: &DeadLetters,
        o: Open<'a>,
        attempts: u32,
        error: &ErrorInfo,
    ) -> Result<Settled<'a>, Stopped> {
        let record = o.record;
        tracing::warn!(
            topic = %record.topic, partition = record.partition, offset = record.offset,
            error_class = %error.class, error = %error.message, attempts,
            "dead-lettering record"
        );
        let sent = dlq.send(record, attempts, error, &o.trace, &self.hard_stop).await;
        if sent.is_err() {
            o.span.end("abandoned", attempts, Some("shutdown grace period over"));
            return Err(Stopped);
        }
        Ok(Settled {
            open: o,
            outcome: "dead_lettered",
            error: Some(error.message.clone()),
        })
    }
}

/// What to send for each record.
fn outgoing<'o>(open: &'o [Open<'_>]) -> Vec<Outgoing<'o>> {
    open.iter()
        .map(|o| Outgoing {
            record: o.record,
            trace: &o.trace,
            idempotency_key: &o.key,
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
