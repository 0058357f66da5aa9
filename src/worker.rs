//! Worker: runs one job (one record, or one batch) to the end.
//!
//! Deliver, classify each answer, then finish the record (2xx), dead-letter it (poison or
//! retries exhausted), or wait and try again. A job ends only when every record in it is
//! finished, its partition was revoked, or shutdown's grace period ran out: a record is
//! never dropped to make progress. With no DLQ configured, an exhausted record keeps being
//! retried at the maximum backoff and blocks its lane.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RetryConfig;
use crate::delivery::AppClient;
use crate::dlq::DeadLetters;
use crate::metrics::Metrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::record::Record;
use crate::retry::{classify, Backoff, ErrorInfo, Transport, Verdict};

/// Everything a job needs; shared by all jobs.
pub struct Worker {
    pub app: AppClient,
    pub dlq: Option<DeadLetters>,
    pub tracker: Arc<OffsetTracker>,
    pub retry: RetryConfig,
    pub metrics: Arc<Metrics>,
    /// Fired when the shutdown grace period is over: abandon unfinished work (it is not committed).
    pub hard_stop: CancellationToken,
}

/// A record still being worked on, with the failed attempts it has used.
struct Open<'a> {
    record: &'a Record,
    failures: u32,
    exhausted_logged: bool,
}

/// The job stopped early: shutdown's hard stop.
struct Stopped;

impl Worker {
    /// Delivers a job; returns when every record is finished or abandoned.
    pub async fn run(&self, job: &[Record]) {
        let _ = self.run_inner(job).await;
    }

    async fn run_inner(&self, job: &[Record]) -> Result<(), Stopped> {
        let mut open: Vec<Open<'_>> = job
            .iter()
            .map(|record| Open {
                record,
                failures: 0,
                exhausted_logged: false,
            })
            .collect();
        let mut backoff = Backoff::from_config(&self.retry);
        let mut attempt = 0u32;
        loop {
            // Work of a revoked partition belongs to its new owner now.
            open.retain(|o| self.tracker.is_current(&tp(o.record), o.record.generation));
            if open.is_empty() {
                return Ok(());
            }
            attempt += 1;
            let records: Vec<&Record> = open.iter().map(|o| o.record).collect();
            let started = std::time::Instant::now();
            let reply = tokio::select! {
                r = self.app.send(&records, attempt) => r,
                _ = self.hard_stop.cancelled() => return Err(Stopped),
            };
            self.metrics
                .observe_delivery(started.elapsed(), &reply.transport);
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
            for (mut o, verdict) in open.into_iter().zip(verdicts) {
                match (verdict, self.dlq.as_ref()) {
                    (Verdict::Success, _) => self.finish(o.record, "delivered"),
                    (Verdict::Poison(error), Some(dlq)) => {
                        self.dead_letter(dlq, o.record, attempt, &error).await?
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
                        self.dead_letter(dlq, o.record, attempt, &error).await?;
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
                    (Verdict::Outage(error), _) => {
                        outage = Some(error);
                        still_open.push(o);
                    }
                }
            }
            open = still_open;
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
                None => {
                    wait.map_or_else(|| backoff.next_delay(), |w| w.min(self.retry.max_backoff))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.hard_stop.cancelled() => return Err(Stopped),
            }
        }
    }

    fn finish(&self, record: &Record, outcome: &'static str) {
        if self
            .tracker
            .finish(&tp(record), record.offset, record.generation)
        {
            self.metrics.record_finished(record, outcome);
        }
    }

    async fn dead_letter(
        &self,
        dlq: &DeadLetters,
        record: &Record,
        attempts: u32,
        error: &ErrorInfo,
    ) -> Result<(), Stopped> {
        tracing::warn!(
            topic = %record.topic, partition = record.partition, offset = record.offset,
            error_class = %error.class, error = %error.message, attempts,
            "dead-lettering record"
        );
        dlq.send(record, attempts, error, &self.hard_stop)
            .await
            .map_err(|_| Stopped)?;
        self.finish(record, "dead_lettered");
        Ok(())
    }
}

fn tp(r: &Record) -> TopicPartition {
    TopicPartition {
        topic: r.topic.clone(),
        partition: r.partition,
    }
}
