//! Settle: what each record's answer means, and acting on it.
//!
//! Each record's answer is classified ([`verdicts`]) and decided ([`decide`]): delivered,
//! dead-lettered (poison, or out of attempts), tried again (counted against
//! `retry.max_attempts` only while the breaker is closed: an outage or push-back never
//! empties a topic into the DLQ), or held in its lane when there is no DLQ to put it in.
//! Delivered and dead-lettered records have their idempotency keys marked done before they
//! are finished, so no offset is committed before its key is done. The wait before the next
//! attempt ([`retry_delay`]) is the outage probe, the app's `Retry-After`, or the backoff.

use std::time::Duration;

use tracing::Instrument;

use super::{outgoing, Open, Settled, Stopped, Worker};
use crate::dedup::OnError;
use crate::delivery::Reply;
use crate::dlq::{DeadLetters, TierWriteError};
use crate::record::Record;
use crate::retry::{classify, Backoff, ErrorInfo, Transport, Verdict};
use crate::retry_topics::{self, Failure, Move};

/// `records_total` outcome of a record moved to a retry tier.
pub(super) const TIERED: &str = "retry_tier";

/// The shortest wait while the app is unreachable or the dedup store does not answer.
const OUTAGE_RETRY_FLOOR: Duration = Duration::from_millis(50);

/// The verdict on each of `n` records sent: from the per-record statuses of a batch answer,
/// else the whole answer's.
pub(super) fn verdicts(reply: &Reply, n: usize, non_retryable: &[u16]) -> Vec<Verdict> {
    match &reply.per_record {
        Some(statuses) => statuses
            .iter()
            .map(|&status| {
                classify(
                    &Transport::Status {
                        status,
                        retry_after: None,
                    },
                    non_retryable,
                )
            })
            .collect(),
        None => vec![classify(&reply.transport, non_retryable); n],
    }
}

/// What happens to one record after an attempt. `D` is the dead-letter destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step<'d, D> {
    /// The app took it: mark its key done and finish it.
    Delivered,
    /// Dead-letter it with this error (poison, or out of attempts).
    DeadLetter(&'d D, ErrorInfo),
    /// Out of attempts here: write it to this retry tier (index) with this error; it is
    /// delivered again from there after the tier's delay.
    Tier(&'d D, usize, ErrorInfo),
    /// Try again after `after` (the app's `Retry-After`) or the backoff. `counted`: this
    /// used one of the record's attempts.
    Retry { after: Option<Duration>, counted: bool },
    /// It cannot be delivered and there is no DLQ: keep it, try again at the maximum backoff.
    Hold(ErrorInfo),
    /// The app is unreachable: wait for it, not counted.
    Outage(ErrorInfo),
}

/// The attempts a record has where it is now (in place, or one from a retry tier) and where
/// it goes once they are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Budget {
    /// Attempts here (`retry.max_attempts`, `retry_topics.in_place_attempts`, or 1 from a tier).
    pub max_attempts: u32,
    /// Attempts made before the record was read (from a retry tier).
    pub prior: u32,
    /// The retry tier (index) it goes to next; `None`: the DLQ.
    pub next_tier: Option<usize>,
}

impl Budget {
    /// Retries in place only (no retry tiers).
    pub(super) fn in_place(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            prior: 0,
            next_tier: None,
        }
    }
}

/// Decides one record's step from its verdict, the failed attempts it has used here before
/// this one, its budget, and whether the breaker is closed (while it is not, the app is
/// having an outage: failures do not use up attempts, and no record moves to a retry tier).
/// Poison skips the tiers. Pure.
pub(super) fn decide<D>(
    verdict: Verdict,
    failures: u32,
    budget: Budget,
    breaker_closed: bool,
    dlq: Option<&D>,
) -> Step<'_, D> {
    let max_attempts = budget.max_attempts;
    let verdict = match verdict {
        Verdict::Retry(error, after) if !breaker_closed => Verdict::Busy(error, after),
        v => v,
    };
    match (verdict, dlq) {
        (Verdict::Success, _) => Step::Delivered,
        (Verdict::Poison(error), Some(dlq)) => Step::DeadLetter(dlq, error),
        (Verdict::Retry(_, after), _) if failures + 1 < max_attempts => Step::Retry { after, counted: true },
        (Verdict::Retry(error, _), Some(dlq)) => match budget.next_tier {
            Some(tier) => Step::Tier(dlq, tier, error),
            None => {
                let attempts = budget.prior.saturating_add(failures + 1);
                let message = format!("{} (gave up after {attempts} attempts)", error.message);
                Step::DeadLetter(dlq, ErrorInfo::new(error.class, message))
            }
        },
        (Verdict::Poison(error) | Verdict::Retry(error, _), None) => Step::Hold(error),
        (Verdict::Busy(_, after), _) => Step::Retry { after, counted: false },
        (Verdict::Outage(error), _) => Step::Outage(error),
    }
}

/// What the records kept open after an attempt ask of the wait before the next one.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct NextTry {
    /// The longest `Retry-After` asked (`retry.max_backoff` for a held record).
    pub wait: Option<Duration>,
    /// The app was unreachable.
    pub outage: Option<ErrorInfo>,
}

impl NextTry {
    pub(super) fn note<D>(&mut self, step: &Step<'_, D>, max_backoff: Duration) {
        match step {
            Step::Delivered | Step::DeadLetter(..) | Step::Tier(..) => {}
            Step::Retry { after, .. } => self.wait = self.wait.max(*after),
            Step::Hold(_) => self.wait = self.wait.max(Some(max_backoff)),
            Step::Outage(error) => self.outage = Some(error.clone()),
        }
    }
}

/// The wait before the next attempt: an outage probes with the backoff (at least
/// [`OUTAGE_RETRY_FLOOR`]), else the longest `Retry-After` (at most `max_backoff`) and
/// without one the backoff.
pub(super) fn retry_delay(next: &NextTry, backoff: &mut Backoff, max_backoff: Duration) -> Duration {
    match (&next.outage, next.wait) {
        (Some(_), _) => backoff.next_delay().max(OUTAGE_RETRY_FLOOR),
        (None, Some(wait)) => wait.min(max_backoff),
        (None, None) => backoff.next_delay(),
    }
}

impl Worker {
    /// Acts on the app's answer to `sending`: delivered and dead-lettered records are settled,
    /// the others go back to `open`. Returns what they ask of the wait before the next attempt.
    pub(super) async fn settle_reply<'a>(
        &self,
        open: &mut Vec<Open<'a>>,
        sending: Vec<Open<'a>>,
        reply: &Reply,
        attempt: u32,
    ) -> Result<NextTry, Stopped> {
        let breaker_closed = self.breaker.state() == crate::breaker::BreakerState::Closed;
        let verdicts = verdicts(reply, sending.len(), &self.retry.non_retryable_statuses);
        let mut still_open = Vec::new();
        let mut settled = Vec::new();
        let mut next = NextTry::default();
        for (mut o, verdict) in sending.into_iter().zip(verdicts) {
            if let (Verdict::Retry(error, _) | Verdict::Poison(error), None) = (&verdict, &o.first_failure) {
                o.first_failure = Some(Box::new(Failure::from_error(error)));
            }
            let step = decide(verdict, o.failures, self.budget(&o), breaker_closed, self.dlq.as_ref());
            next.note(&step, self.retry.max_backoff);
            match step {
                Step::Delivered => settled.push(Settled {
                    open: o,
                    outcome: "delivered",
                    error: None,
                }),
                Step::DeadLetter(dlq, error) => settled.push(self.dead_letter(dlq, o, attempt, &error).await?),
                Step::Tier(dlq, tier, error) => settled.push(self.to_tier(dlq, o, attempt, tier, &error).await?),
                Step::Retry { counted, .. } => {
                    o.failures += u32::from(counted);
                    self.metrics.record_outcome(o.record, "retried");
                    still_open.push(o);
                }
                Step::Hold(error) => {
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
                    still_open.push(o);
                }
                Step::Outage(_) => still_open.push(o),
            }
        }
        open.append(&mut still_open);
        self.settle(settled, attempt).await?;
        Ok(next)
    }

    /// Marks the keys of delivered and dead-lettered records done (one round trip), then
    /// finishes the records, so that no offset is committed before its key is done. With
    /// `dedup.on_error = "pause"` a failing store is retried until it answers.
    pub(super) async fn settle(&self, settled: Vec<Settled<'_>>, attempts: u32) -> Result<(), Stopped> {
        if let Some(gate) = &self.dedup {
            // A record moved to a retry tier is not done: its claim is let go, so that its
            // delivery from the tier is not taken for a duplicate.
            let tiered: Vec<(&Record, &str)> = settled
                .iter()
                .filter(|s| s.outcome == TIERED)
                .map(|s| (s.open.record, s.open.key.as_str()))
                .collect();
            if !tiered.is_empty() {
                gate.release(&tiered).await;
            }
        }
        let done = settled.iter().filter(|s| s.outcome != TIERED).count();
        if let (Some(gate), true) = (&self.dedup, done > 0) {
            let items: Vec<(&Record, &str)> = settled
                .iter()
                .filter(|s| s.outcome != TIERED)
                .map(|s| (s.open.record, s.open.key.as_str()))
                .collect();
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
                        if self.sleep(backoff.next_delay().max(OUTAGE_RETRY_FLOOR)).await.is_err() {
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
        self.finish_all(settled, attempts);
        Ok(())
    }

    /// Finishes records (one job's): their offsets may be committed. One offset-tracker call
    /// and one metrics update for all, not one per record: a batch finishes 500 at once.
    pub(super) fn finish_all(&self, settled: Vec<Settled<'_>>, attempts: u32) {
        let finished = self.tracker.finish_all(settled.iter().map(|s| {
            let r = s.open.record;
            (&r.topic, r.partition, r.offset, r.generation)
        }));
        // A record of a revoked partition (not finished now) is not counted: its new owner counts it.
        let counted = settled.iter().zip(&finished).filter(|(_, &now)| now).map(|(s, _)| {
            let exemplar = crate::metrics::trace_exemplar(s.open.span.context());
            (s.open.record, s.outcome, exemplar)
        });
        self.metrics.records_finished(counted);
        for (s, now) in settled.into_iter().zip(finished) {
            if let (true, Some(_), "delivered") = (now, &s.open.retry, s.outcome) {
                self.metrics.retry_tier_delivered(&s.open.record.topic);
            }
            s.open.span.end(s.outcome, attempts, s.error.as_deref());
        }
    }

    /// A request that can never be sent (single mode: metadata headers over
    /// `app.max_header_bytes`) is the record's fault; the app is not called. `Some(error)`
    /// when `sending` is such a request.
    pub(super) fn refusal(&self, sending: &[Open<'_>]) -> Option<ErrorInfo> {
        self.app.refusal(&outgoing(sending))
    }

    /// Records that cannot be sent at all: dead-lettered with `error`, or without a DLQ kept
    /// in their lane (checked again every `retry.max_backoff`, like other poison). Counted
    /// once per record as `records_total{outcome=<error class>}`.
    pub(super) async fn refuse<'a>(
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
                self.metrics.record_outcome(o.record, error.class.clone());
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

    pub(super) async fn dead_letter<'a>(
        &self,
        dlq: &DeadLetters,
        o: Open<'a>,
        attempts: u32,
        error: &ErrorInfo,
    ) -> Result<Settled<'a>, Stopped> {
        let record = o.record;
        // Lines logged here carry this record's trace and delivery span (in a batch, the
        // job's span names only the first record's).
        let log_span = match o.span.log_ids() {
            Some((trace_id, span_id)) => tracing::info_span!("record", trace_id = %trace_id, span_id = %span_id),
            None => tracing::Span::none(),
        };
        let entered = log_span.enter();
        let attempts = o.prior_attempts().saturating_add(attempts);
        tracing::warn!(
            topic = %record.topic, partition = record.partition, offset = record.offset,
            error_class = %error.class, error = %error.message, attempts,
            "dead-lettering record"
        );
        o.span.set_error_class(&error.class);
        let send_span = o.span.dead_letter(dlq.topic());
        let send_trace = send_span.headers();
        let trace = send_trace.as_ref().unwrap_or(&o.trace);
        drop(entered);
        let sent = dlq
            .send(record, attempts, error, trace, &self.hard_stop)
            .instrument(log_span)
            .await;
        let Ok(written) = sent else {
            send_span.end(Err("shutdown"));
            o.span.end("abandoned", attempts, Some("shutdown grace period over"));
            return Err(Stopped);
        };
        send_span.end(Ok(written));
        Ok(Settled {
            open: o,
            outcome: "dead_lettered",
            error: Some(error.message.clone()),
        })
    }
}

impl Worker {
    /// The attempts `o` has where it is now, and where it goes after them.
    pub(super) fn budget(&self, o: &Open<'_>) -> Budget {
        match &self.tiers {
            None => Budget::in_place(self.retry.max_attempts),
            Some(tiers) => {
                let pass = tiers.pass(&o.record.topic);
                Budget {
                    max_attempts: pass.max_attempts,
                    prior: o.prior_attempts(),
                    next_tier: pass.next_tier,
                }
            }
        }
    }

    /// Writes a record that used its attempts here to retry tier `tier` (through the DLQ
    /// producer: finished only once the broker acknowledged the write). A record too large
    /// for the tier topic is dead-lettered instead.
    pub(super) async fn to_tier<'a>(
        &self,
        dlq: &DeadLetters,
        o: Open<'a>,
        attempt: u32,
        tier_index: usize,
        error: &ErrorInfo,
    ) -> Result<Settled<'a>, Stopped> {
        let Some(tier) = self.tiers.as_ref().and_then(|t| t.get(tier_index)) else {
            // Budget only names configured tiers; dead-letter rather than lose the record.
            return self.dead_letter(dlq, o, attempt, error).await;
        };
        let record = o.record;
        let attempts = o.prior_attempts().saturating_add(attempt);
        let now = retry_topics::now_ms();
        let last = Failure::from_error(error);
        let first = o.first_failure.as_deref().cloned().unwrap_or_else(|| last.clone());
        let own = retry_topics::Origin::of(record);
        let origin = o.retry.as_ref().map_or(&own, |r| &r.origin);
        let delay_ms = i64::try_from(tier.delay.as_millis()).unwrap_or(i64::MAX);
        let headers = Move {
            origin,
            tier: tier_index,
            attempts,
            first: &first,
            last: &last,
            not_before_ms: now.saturating_add(delay_ms),
            group: &self.group,
            history: o.retry.as_ref().map_or("", |r| r.history.as_str()),
            now_ms: now,
        }
        .headers();
        tracing::info!(
            topic = %record.topic, partition = record.partition, offset = record.offset,
            error_class = %error.class, attempts, retry_topic = %tier.topic, delay = ?tier.delay,
            "moving record to a retry tier"
        );
        match dlq
            .send_to_tier(record, &tier.topic, &headers, &o.trace, &self.hard_stop)
            .await
        {
            Ok(()) => {
                self.metrics.retry_tier_sent(&tier.topic);
                Ok(Settled {
                    open: o,
                    outcome: TIERED,
                    error: Some(error.message.clone()),
                })
            }
            Err(TierWriteError::TooLarge) => {
                tracing::warn!(
                    topic = %record.topic, partition = record.partition, offset = record.offset,
                    retry_topic = %tier.topic,
                    "record too large for the retry tier topic; dead-lettering it instead \
                     (raise max.message.bytes of the tier topic)"
                );
                let error = ErrorInfo::new(
                    error.class.clone(),
                    format!("{} (too large for retry tier {})", error.message, tier.topic),
                );
                self.dead_letter(dlq, o, attempt, &error).await
            }
            Err(TierWriteError::Interrupted) => {
                o.span.end("abandoned", attempts, Some("shutdown grace period over"));
                Err(Stopped)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DLQ: Option<&()> = Some(&());
    const NO_DLQ: Option<&()> = None;
    const MAX: u32 = 3;
    const SECOND: Duration = Duration::from_secs(1);

    fn error(class: &str) -> ErrorInfo {
        ErrorInfo::new(class, format!("{class} happened"))
    }

    fn poison() -> Verdict {
        Verdict::Poison(error("http_422"))
    }

    fn retry(after: Option<Duration>) -> Verdict {
        Verdict::Retry(error("http_500"), after)
    }

    fn busy(after: Option<Duration>) -> Verdict {
        Verdict::Busy(error("http_503"), after)
    }

    fn outage() -> Verdict {
        Verdict::Outage(error("unreachable"))
    }

    fn exhausted(attempts: u32) -> ErrorInfo {
        ErrorInfo::new(
            "http_500",
            format!("http_500 happened (gave up after {attempts} attempts)"),
        )
    }

    /// (verdict, failures before this attempt, breaker closed, dlq) and the step expected.
    type Case = (Verdict, u32, bool, Option<&'static ()>, Step<'static, ()>);

    #[test]
    fn each_verdict_settles_retries_dead_letters_or_holds_its_record() {
        let counted = |after| Step::Retry { after, counted: true };
        let uncounted = |after| Step::Retry { after, counted: false };
        let table: Vec<Case> = vec![
            (Verdict::Success, 0, true, DLQ, Step::Delivered),
            (Verdict::Success, 2, false, NO_DLQ, Step::Delivered),
            // Poison: dead-lettered at once, whatever the breaker; held without a DLQ.
            (poison(), 0, true, DLQ, Step::DeadLetter(&(), error("http_422"))),
            (poison(), 0, false, DLQ, Step::DeadLetter(&(), error("http_422"))),
            (poison(), 0, true, NO_DLQ, Step::Hold(error("http_422"))),
            // Retryable: counted while attempts are left, then dead-lettered (or held).
            (retry(None), 0, true, DLQ, counted(None)),
            (retry(Some(SECOND)), 1, true, DLQ, counted(Some(SECOND))),
            (retry(None), 2, true, DLQ, Step::DeadLetter(&(), exhausted(3))),
            (retry(None), 7, true, DLQ, Step::DeadLetter(&(), exhausted(8))),
            (retry(None), 1, true, NO_DLQ, counted(None)),
            (retry(None), 2, true, NO_DLQ, Step::Hold(error("http_500"))),
            // The breaker not closed: the app has an outage, nothing is counted or dead-lettered.
            (retry(Some(SECOND)), 2, false, DLQ, uncounted(Some(SECOND))),
            (retry(None), 9, false, NO_DLQ, uncounted(None)),
            // Push-back and outages never count and never dead-letter.
            (busy(Some(SECOND)), 2, true, DLQ, uncounted(Some(SECOND))),
            (busy(None), 9, true, NO_DLQ, uncounted(None)),
            (outage(), 2, true, DLQ, Step::Outage(error("unreachable"))),
            (outage(), 9, false, NO_DLQ, Step::Outage(error("unreachable"))),
        ];
        for (verdict, failures, closed, dlq, expected) in table {
            let case = format!(
                "{verdict:?}, failures {failures}, breaker closed {closed}, dlq {}",
                dlq.is_some()
            );
            assert_eq!(
                decide(verdict, failures, Budget::in_place(MAX), closed, dlq),
                expected,
                "{case}"
            );
        }
    }

    #[test]
    fn with_retry_tiers_an_exhausted_record_moves_to_the_next_tier_but_poison_and_outages_never_do() {
        let to_tier = |next_tier| Budget {
            max_attempts: 2,
            prior: 0,
            next_tier,
        };
        let last_tier = Budget {
            max_attempts: 1,
            prior: 4,
            next_tier: None,
        };
        let table = [
            (
                retry(None),
                0,
                true,
                to_tier(Some(0)),
                Step::Retry {
                    after: None,
                    counted: true,
                },
            ),
            (
                retry(None),
                1,
                true,
                to_tier(Some(0)),
                Step::Tier(&(), 0, error("http_500")),
            ),
            (
                retry(None),
                0,
                true,
                Budget {
                    max_attempts: 1,
                    ..to_tier(Some(1))
                },
                Step::Tier(&(), 1, error("http_500")),
            ),
            (retry(None), 0, true, last_tier, Step::DeadLetter(&(), exhausted(5))),
            // Poison skips the tiers.
            (
                poison(),
                0,
                true,
                to_tier(Some(0)),
                Step::DeadLetter(&(), error("http_422")),
            ),
            // An open breaker (an outage) never moves a record to a tier.
            (
                retry(None),
                1,
                false,
                to_tier(Some(0)),
                Step::Retry {
                    after: None,
                    counted: false,
                },
            ),
            (outage(), 5, true, to_tier(Some(0)), Step::Outage(error("unreachable"))),
            (
                busy(None),
                5,
                true,
                to_tier(Some(0)),
                Step::Retry {
                    after: None,
                    counted: false,
                },
            ),
        ];
        for (verdict, failures, closed, budget, expected) in table {
            let case = format!("{verdict:?}, failures {failures}, closed {closed}, {budget:?}");
            assert_eq!(decide(verdict, failures, budget, closed, DLQ), expected, "{case}");
        }
    }

    #[test]
    fn a_batch_answer_is_classified_per_record_else_as_a_whole() {
        let non_retryable = [422];
        let per_record = Reply {
            transport: Transport::Status {
                status: 200,
                retry_after: None,
            },
            per_record: Some(vec![200, 422, 500]),
        };
        let v = verdicts(&per_record, 3, &non_retryable);
        assert!(
            matches!(v[..], [Verdict::Success, Verdict::Poison(_), Verdict::Retry(_, None)]),
            "{v:?}"
        );

        let whole = Reply {
            transport: Transport::Status {
                status: 503,
                retry_after: Some(SECOND),
            },
            per_record: None,
        };
        let v = verdicts(&whole, 2, &non_retryable);
        assert_eq!(v.len(), 2);
        assert!(
            v.iter()
                .all(|v| matches!(v, Verdict::Busy(e, Some(d)) if e.class == "http_503" && *d == SECOND)),
            "{v:?}"
        );
    }

    fn next_try(steps: &[Step<'_, ()>]) -> NextTry {
        let mut next = NextTry::default();
        for step in steps {
            next.note(step, Duration::from_secs(30));
        }
        next
    }

    #[test]
    fn the_records_kept_open_ask_for_the_longest_retry_after_or_the_max_backoff_when_held() {
        let retry = |after| Step::Retry { after, counted: true };
        assert_eq!(next_try(&[Step::Delivered, retry(None)]), NextTry::default());
        assert_eq!(
            next_try(&[retry(Some(SECOND)), retry(None), retry(Some(2 * SECOND))]).wait,
            Some(2 * SECOND)
        );
        let held = Step::Hold(error("http_422"));
        for steps in [
            [retry(Some(60 * SECOND)), held.clone()],
            [held.clone(), retry(Some(SECOND))],
        ] {
            let next = next_try(&steps);
            assert!(next.wait >= Some(30 * SECOND), "at least the max backoff: {next:?}");
            let delay = retry_delay(&next, &mut Backoff::new(SECOND, SECOND), 30 * SECOND);
            assert_eq!(
                delay,
                30 * SECOND,
                "a held record waits the max backoff, whatever the order"
            );
        }
        let next = next_try(&[retry(Some(SECOND)), Step::Outage(error("unreachable")), held]);
        assert_eq!(next.outage, Some(error("unreachable")));
    }

    #[test]
    fn the_next_wait_is_the_outage_probe_else_retry_after_else_the_backoff() {
        let max = Duration::from_secs(30);
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(10));
        let outage = NextTry {
            wait: Some(SECOND),
            outage: Some(error("unreachable")),
        };
        assert_eq!(
            retry_delay(&outage, &mut backoff, max),
            OUTAGE_RETRY_FLOOR,
            "the backoff, floored"
        );

        let mut backoff = Backoff::new(SECOND, max);
        let asked = NextTry {
            wait: Some(2 * SECOND),
            outage: None,
        };
        assert_eq!(retry_delay(&asked, &mut backoff, max), 2 * SECOND);
        assert_eq!(backoff.ceiling(), SECOND, "Retry-After does not step the backoff");
        let too_long = NextTry {
            wait: Some(3600 * SECOND),
            outage: None,
        };
        assert_eq!(
            retry_delay(&too_long, &mut backoff, max),
            max,
            "capped at retry.max_backoff"
        );

        let delay = retry_delay(&NextTry::default(), &mut backoff, max);
        assert!(delay <= SECOND, "{delay:?}");
        assert_eq!(backoff.ceiling(), 2 * SECOND, "the backoff stepped");
    }
}
