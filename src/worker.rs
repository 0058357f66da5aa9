//! Worker: runs one job (one record, or one batch) to the end.
//!
//! Deliver, classify each answer, then finish the record (2xx), dead-letter it (poison or
//! retries exhausted), or wait and try again. A job ends only when every record in it is
//! finished, its partition was revoked, or shutdown's grace period ran out: a record is
//! never dropped to make progress. With no DLQ configured, an exhausted record keeps being
//! retried at the maximum backoff and blocks its lane.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::breaker::{counts_as_failure, Admission, Breaker, BreakerState};
use crate::config::RetryConfig;
use crate::delivery::{AppClient, Outgoing};
use crate::dlq::DeadLetters;
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, TopicPartition};
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
}

/// A record still being worked on, with the failed attempts it has used.
struct Open<'a> {
    record: &'a Record,
    failures: u32,
    exhausted_logged: bool,
    span: DeliverySpan,
    /// `traceparent`/`tracestate` of the delivery span, passed to the app and the DLQ.
    trace: HashMap<String, String>,
}

/// The job stopped early: shutdown's hard stop.
struct Stopped;

impl Worker {
    /// Delivers a job; returns when every record is finished or abandoned.
    pub async fn run(&self, job: &[Record]) {
        let mut open: Vec<Open<'_>> = job
            .iter()
            .map(|record| {
                let span = DeliverySpan::start(record, &self.group);
                Open {
                    record,
                    failures: 0,
                    exhausted_logged: false,
                    trace: span.headers(),
                    span,
                }
            })
            .collect();
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

    async fn run_inner<'a>(&self, open: &mut Vec<Open<'a>>) -> Result<(), Stopped> {
        let mut backoff = Backoff::from_config(&self.retry);
        let mut attempt = 0u32;
        loop {
            // Work of a revoked partition belongs to its new owner now.
            let (current, revoked): (Vec<_>, Vec<_>) = std::mem::take(open)
                .into_iter()
                .partition(|o| self.tracker.is_current(&tp(o.record), o.record.generation));
            *open = current;
            for o in revoked {
                o.span.end("revoked", attempt, None);
            }
            if open.is_empty() {
                return Ok(());
            }
            attempt += 1;
            let records: Vec<Outgoing<'_>> = open
                .iter()
                .map(|o| Outgoing {
                    record: o.record,
                    trace: &o.trace,
                })
                .collect();
            // One key for the per-key rate limit; a batch of mixed keys is limited globally only.
            let key = match open.as_slice() {
                [only] => only.record.key.as_deref(),
                _ => None,
            };
            let gate_started = Instant::now();
            let (admission, permit) = tokio::select! {
                g = self.admit(key, open.len() as u32) => g,
                _ = self.hard_stop.cancelled() => return Err(Stopped),
            };
            self.metrics
                .rate_limit_wait_seconds
                .inc_by(gate_started.elapsed().as_secs_f64());
            let started = Instant::now();
            let reply = tokio::select! {
                r = self.app.send(&records, attempt) => r,
                _ = self.hard_stop.cancelled() => return Err(Stopped),
            };
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
                    vec![classify(&reply.transport, &self.retry.non_retryable_statuses); open.len()]
                }
            };
            let mut still_open = Vec::new();
            let mut wait: Option<Duration> = None;
            let mut outage = None;
            for (mut o, verdict) in std::mem::take(open).into_iter().zip(verdicts) {
                let verdict = match verdict {
                    Verdict::Retry(error, after) if !counting => Verdict::Busy(error, after),
                    v => v,
                };
                match (verdict, self.dlq.as_ref()) {
                    (Verdict::Success, _) => self.finish(o, attempt, "delivered", None),
                    (Verdict::Poison(error), Some(dlq)) => self.dead_letter(dlq, o, attempt, &error).await?,
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
                        self.dead_letter(dlq, o, attempt, &error).await?;
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
            *open = still_open;
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
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.hard_stop.cancelled() => return Err(Stopped),
            }
        }
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

    async fn dead_letter(
        &self,
        dlq: &DeadLetters,
        o: Open<'_>,
        attempts: u32,
        error: &ErrorInfo,
    ) -> Result<(), Stopped> {
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
        self.finish(o, attempts, "dead_lettered", Some(&error.message));
        Ok(())
    }
}

fn tp(r: &Record) -> TopicPartition {
    TopicPartition {
        topic: r.topic.clone(),
        partition: r.partition,
    }
}
