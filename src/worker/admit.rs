//! Admit: which open records go out in this attempt, and the wait for the app's gates.
//!
//! A record goes out only while its partition is still ours (a revoked partition's work
//! belongs to its new owner) and, with dedup on, while its idempotency key is claimed by it:
//! a key already done finishes the record as `deduplicated`, a key held elsewhere makes it
//! wait. The attempt then waits until the circuit breaker admits a request and the rate
//! limiter grants a slot; the returned [`Pass`] is held until the app has answered.

use std::time::Duration;

use tokio::time::Instant;

use super::{keys, Open, Settled, Stopped, Worker};
use crate::breaker::Admission;
use crate::config::RetryConfig;
use crate::dedup::{Decision, OnError};
use crate::ratelimit::Permit;
use crate::retry::Backoff;

/// The shortest wait while the dedup store does not answer.
const STORE_RETRY_FLOOR: Duration = Duration::from_millis(50);

/// What the dedup store said about the open records' keys.
#[derive(Debug, Clone, Copy)]
pub(super) enum ClaimAnswer<'d> {
    /// One decision per open record, in order.
    Decided(&'d [Decision]),
    /// The store did not answer; what `dedup.on_error` says to do then.
    Unavailable(OnError),
}

/// What the claim means for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    /// Deliver it in this attempt.
    Send,
    /// Keep it, and try its key again later.
    Wait,
    /// Its key is done: finish it without delivering.
    Duplicate,
}

/// The claim's meaning for the `i`th open record. A missing decision (never: the gate
/// answers for every key) makes the record wait rather than be lost.
pub(super) fn admit_of(answer: ClaimAnswer<'_>, i: usize) -> Admit {
    match answer {
        ClaimAnswer::Decided(decisions) => match decisions.get(i) {
            Some(Decision::Deliver) => Admit::Send,
            Some(Decision::Duplicate) => Admit::Duplicate,
            Some(Decision::Wait) | None => Admit::Wait,
        },
        ClaimAnswer::Unavailable(OnError::Deliver) => Admit::Send,
        ClaimAnswer::Unavailable(OnError::Pause) => Admit::Wait,
    }
}

/// A record that can be held back from an attempt.
pub(super) trait Admittable {
    fn set_ready(&mut self, ready: bool);
}

impl Admittable for Open<'_> {
    fn set_ready(&mut self, ready: bool) {
        self.ready = ready;
    }
}

/// Applies the claim's answer to the open records, in order: those to send now or later stay
/// open (marked ready or not), the duplicates are returned to be finished.
pub(super) fn apply_claim<T: Admittable>(open: &mut Vec<T>, answer: ClaimAnswer<'_>) -> Vec<T> {
    let all = std::mem::take(open);
    open.reserve(all.len());
    let mut duplicates = Vec::new();
    for (i, mut o) in all.into_iter().enumerate() {
        match admit_of(answer, i) {
            Admit::Duplicate => duplicates.push(o),
            admit => {
                o.set_ready(admit == Admit::Send);
                open.push(o);
            }
        }
    }
    duplicates
}

/// Splits off the records that go out in this attempt, in order.
pub(super) fn take_ready<T>(open: &mut Vec<T>, ready: impl Fn(&T) -> bool) -> Vec<T> {
    let (sending, waiting): (Vec<_>, Vec<_>) = std::mem::take(open).into_iter().partition(ready);
    *open = waiting;
    sending
}

/// The waits of a job whose records cannot go out yet: a key held elsewhere (short and
/// growing, the holder is usually about to finish) or a dedup store not answering (the
/// retry backoff, at least [`STORE_RETRY_FLOOR`]).
pub(super) struct ClaimWait {
    key: Backoff,
    store: Backoff,
    store_failures: u32,
}

impl ClaimWait {
    pub(super) fn new(retry: &RetryConfig) -> Self {
        Self {
            key: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
            store: Backoff::from_config(retry),
            store_failures: 0,
        }
    }

    /// The store answered: its backoff starts over.
    pub(super) fn store_answered(&mut self) {
        self.store_failures = 0;
        self.store.reset();
    }

    /// The store failed again; returns how many times in a row.
    pub(super) fn store_failed(&mut self) -> u32 {
        self.store_failures += 1;
        self.store_failures
    }

    /// How long to wait before claiming again when no record could go out.
    pub(super) fn delay(&mut self) -> Duration {
        if self.store_failures > 0 {
            self.store.next_delay().max(STORE_RETRY_FLOOR)
        } else {
            self.key.next_delay()
        }
    }
}

/// The breaker's admission and the rate limiter's slot, held for one request.
pub(super) struct Pass<'w> {
    _admission: Admission<'w>,
    _permit: Permit,
}

impl Worker {
    /// Drops the records of revoked partitions (releasing their keys): their new owner
    /// delivers them.
    pub(super) async fn drop_revoked(&self, open: &mut Vec<Open<'_>>, attempt: u32) {
        // One offset-tracker call for the job, not one per record.
        let current = self.tracker.current_all(open.iter().map(|o| {
            let r = o.record;
            (&r.topic, r.partition, r.generation)
        }));
        if current.iter().all(|&c| c) {
            return;
        }
        let mut current = current.into_iter();
        let (kept, revoked): (Vec<_>, Vec<_>) = std::mem::take(open)
            .into_iter()
            .partition(|_| current.next().unwrap_or(false));
        *open = kept;
        if let Some(gate) = &self.dedup {
            gate.release(&keys(&revoked)).await;
        }
        for o in revoked {
            o.span.end("revoked", attempt, None);
        }
    }

    /// With dedup on, claims the open records' keys (one round trip) and applies the answer:
    /// duplicates are finished, the others marked ready to send or not.
    pub(super) async fn claim_keys(&self, open: &mut Vec<Open<'_>>, attempt: u32, wait: &mut ClaimWait) {
        let Some(gate) = &self.dedup else {
            return;
        };
        let claimed = gate.claim(&keys(open)).await;
        let answer = match &claimed {
            Ok(decisions) => {
                wait.store_answered();
                ClaimAnswer::Decided(decisions)
            }
            Err(e) if gate.on_error() == OnError::Deliver => {
                tracing::warn!(error = %e, records = open.len(), "dedup store unavailable; delivering without dedup (dedup.on_error = \"deliver\")");
                self.metrics.dedup_bypassed.inc_by(open.len() as u64);
                ClaimAnswer::Unavailable(OnError::Deliver)
            }
            Err(e) => {
                let failures = wait.store_failed();
                if failures == 1 || failures % 20 == 0 {
                    tracing::warn!(error = %e, store = gate.target(), failures, "dedup store unavailable; holding records until it answers (dedup.on_error = \"pause\")");
                }
                ClaimAnswer::Unavailable(OnError::Pause)
            }
        };
        let duplicates = apply_claim(open, answer)
            .into_iter()
            .map(|open| Settled {
                open,
                outcome: "deduplicated",
                error: None,
            })
            .collect();
        self.finish_all(duplicates, attempt);
    }

    /// Waits until the breaker admits a request and the rate limiter grants a slot for
    /// `sending`, or until shutdown's hard stop. The wait is counted in
    /// `rate_limit_wait_seconds_total`.
    pub(super) async fn pass_gates(&self, sending: &[Open<'_>]) -> Result<Pass<'_>, Stopped> {
        // One key for the per-key rate limit; a batch of mixed keys is limited globally only.
        let key = match sending {
            [only] => only.record.key.as_deref(),
            _ => None,
        };
        let gates = async {
            let admission = self.breaker.wait_until_allowed().await;
            let permit = self.limiter.acquire(key, sending.len() as u32).await;
            Pass {
                _admission: admission,
                _permit: permit,
            }
        };
        let started = Instant::now();
        tokio::select! {
            pass = gates => {
                self.metrics.rate_limit_wait_seconds.inc_by(started.elapsed().as_secs_f64());
                Ok(pass)
            }
            _ = self.hard_stop.cancelled() => Err(Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An open record in the tests: its offset and whether it goes out.
    #[derive(Debug, PartialEq, Eq)]
    struct Rec(i64, bool);

    impl Admittable for Rec {
        fn set_ready(&mut self, ready: bool) {
            self.1 = ready;
        }
    }

    fn open() -> Vec<Rec> {
        (0..3).map(|o| Rec(o, false)).collect()
    }

    #[test]
    fn claim_decisions_send_hold_or_finish_each_record_in_order() {
        use Decision::*;
        let cases: [(&[Decision], &[Rec], &[i64]); 4] = [
            (
                &[Deliver, Deliver, Deliver],
                &[Rec(0, true), Rec(1, true), Rec(2, true)],
                &[],
            ),
            (&[Duplicate, Deliver, Wait], &[Rec(1, true), Rec(2, false)], &[0]),
            (&[Wait, Duplicate, Duplicate], &[Rec(0, false)], &[1, 2]),
            // A decision missing (the gate never does this): the record waits, it is not lost.
            (&[Deliver], &[Rec(0, true), Rec(1, false), Rec(2, false)], &[]),
        ];
        for (decisions, kept, duplicates) in cases {
            let mut records = open();
            let dups = apply_claim(&mut records, ClaimAnswer::Decided(decisions));
            assert_eq!(records, kept, "{decisions:?}");
            assert_eq!(
                dups.iter().map(|r| r.0).collect::<Vec<_>>(),
                duplicates,
                "{decisions:?}"
            );
        }
    }

    #[test]
    fn a_store_that_does_not_answer_holds_every_record_or_sends_it_as_on_error_says() {
        let mut records = open();
        assert!(apply_claim(&mut records, ClaimAnswer::Unavailable(OnError::Pause)).is_empty());
        assert_eq!(records, [Rec(0, false), Rec(1, false), Rec(2, false)]);

        let mut records = open();
        assert!(apply_claim(&mut records, ClaimAnswer::Unavailable(OnError::Deliver)).is_empty());
        assert_eq!(records, [Rec(0, true), Rec(1, true), Rec(2, true)]);
    }

    #[test]
    fn the_ready_records_go_out_in_order_and_the_others_stay_open() {
        let mut records = vec![Rec(0, true), Rec(1, false), Rec(2, true), Rec(3, false)];
        let sending = take_ready(&mut records, |r| r.1);
        assert_eq!(sending, [Rec(0, true), Rec(2, true)]);
        assert_eq!(records, [Rec(1, false), Rec(3, false)]);
    }

    #[test]
    fn a_held_key_waits_briefly_and_a_silent_store_waits_the_retry_backoff() {
        let retry = RetryConfig {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            ..RetryConfig::default()
        };
        let mut wait = ClaimWait::new(&retry);
        for _ in 0..3 {
            assert!(
                wait.delay() <= Duration::from_millis(200),
                "key backoff: 50ms, doubling"
            );
        }
        assert_eq!(wait.store_failed(), 1);
        assert_eq!(wait.store_failed(), 2);
        assert_eq!(wait.delay(), STORE_RETRY_FLOOR, "store backoff, never under the floor");
        wait.store_answered();
        assert!(
            wait.delay() <= Duration::from_millis(400),
            "back to the key backoff (its own step kept)"
        );
    }
}
