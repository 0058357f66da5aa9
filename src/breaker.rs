//! Circuit breaker on the app: stop sending when the app is down, probe until it is back.
//!
//! The breaker counts the outcomes of deliveries over a sliding `window` (kept as ten
//! slices, so old outcomes leave it a tenth of a window at a time). When the window holds
//! at least `min_requests` outcomes and at least `failure_ratio` of them are failures, the
//! breaker opens: no delivery starts, the poll loop pauses every partition, and nothing is
//! dead-lettered (records wait in memory, the lag grows). After `cool_down` it turns
//! half-open: exactly one delivery goes through as a probe while the others keep waiting.
//! If the probe succeeds the breaker closes and every waiting delivery proceeds; if it
//! fails the breaker opens again for twice the previous cool-down, at most `max_cool_down`.
//!
//! A failure is what says the app itself is unwell: a 5xx, a timeout, a connection that
//! could not be made or broke. A 4xx is the record's problem and 429 is the rate
//! limiter's business ([`counts_as_failure`] is that policy). Outcomes reported while the
//! breaker is open belong to requests sent before it opened and are ignored. While
//! half-open, the first outcome reported decides, whether it comes from the probe or from
//! a request that was still in flight: either way it is fresh news from the app.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

pub use crate::config::BreakerConfig;
use crate::retry::Transport;

/// The window is kept as this many slices.
const SLICES: u64 = 10;

/// Whether an app answer counts against the app: 5xx, timeouts and connection errors.
pub fn counts_as_failure(outcome: &Transport) -> bool {
    match outcome {
        Transport::Status { status, .. } => *status >= 500,
        Transport::Timeout | Transport::Unreachable(_) | Transport::Failed(_) => true,
    }
}

/// The breaker's state, as shown in `/status` and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Deliveries flow.
    Closed,
    /// The app is considered down: no delivery starts.
    Open,
    /// The cool-down is over: one probe delivery at a time.
    HalfOpen,
}

impl BreakerState {
    /// Gauge value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Outcomes of one slice of the window.
#[derive(Debug, Clone, Copy, Default)]
struct Slice {
    epoch: u64,
    total: u32,
    failures: u32,
}

/// Outcome counts over a sliding window, in [`SLICES`] fixed slices: bounded memory
/// whatever the request rate.
#[derive(Debug)]
struct Window {
    origin: Instant,
    slice: Duration,
    slices: [Slice; SLICES as usize],
}

impl Window {
    fn new(length: Duration) -> Self {
        Self {
            origin: Instant::now(),
            slice: (length / SLICES as u32).max(Duration::from_nanos(1)),
            slices: [Slice::default(); SLICES as usize],
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        let n = now.duration_since(self.origin).as_nanos() / self.slice.as_nanos();
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    fn add(&mut self, now: Instant, failure: bool) {
        let epoch = self.epoch(now);
        let slice = &mut self.slices[(epoch % SLICES) as usize];
        if slice.epoch != epoch {
            *slice = Slice {
                epoch,
                ..Slice::default()
            };
        }
        slice.total = slice.total.saturating_add(1);
        slice.failures = slice.failures.saturating_add(u32::from(failure));
    }

    /// `(outcomes, failures)` in the slices still inside the window.
    fn counts(&self, now: Instant) -> (u32, u32) {
        let epoch = self.epoch(now);
        self.slices
            .iter()
            .filter(|s| s.epoch <= epoch && epoch - s.epoch < SLICES)
            .fold((0, 0), |(t, f), s| {
                (t.saturating_add(s.total), f.saturating_add(s.failures))
            })
    }

    fn clear(&mut self) {
        self.slices = [Slice::default(); SLICES as usize];
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    /// `probe`: the id of the admission let through as the probe, if one is out.
    HalfOpen {
        probe: Option<u64>,
    },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    window: Window,
    /// The cool-down of the next (re)opening.
    cool_down: Duration,
    next_probe: u64,
}

/// The circuit breaker. Shared by all workers and the poll loop.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
    /// Woken on every change of state, so waiters re-check without polling.
    changed: Notify,
}

/// Permission to send one delivery, from [`Breaker::wait_until_allowed`].
///
/// Keep it until the delivery's outcome has been passed to [`Breaker::record`]. If it is
/// the half-open probe and is dropped before an outcome was recorded (the job was
/// abandoned), the next waiting delivery becomes the probe.
#[must_use = "hold the admission until the outcome is recorded; dropping it frees the probe slot"]
#[derive(Debug)]
pub struct Admission<'a> {
    breaker: &'a Breaker,
    probe: Option<u64>,
}

impl Admission<'_> {
    /// Whether this delivery is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.probe {
            self.breaker.abandon_probe(id);
        }
    }
}

impl Breaker {
    /// A closed breaker (always closed when `cfg.enabled` is false).
    pub fn new(cfg: BreakerConfig) -> Self {
        let inner = Inner {
            phase: Phase::Closed,
            window: Window::new(cfg.window),
            cool_down: cfg.cool_down,
            next_probe: 0,
        };
        Self {
            cfg,
            inner: Mutex::new(inner),
            changed: Notify::new(),
        }
    }

    /// The current state (an expired cool-down reads as half-open).
    pub fn state(&self) -> BreakerState {
        match self.lock_current().phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// True while the cool-down runs: the poll loop keeps every partition paused. Half-open
    /// reads as not open, so records can reach a worker to serve as the probe.
    pub fn is_open(&self) -> bool {
        self.state() == BreakerState::Open
    }

    /// Returns at once when closed; waits while open; when half-open, lets one caller
    /// through as the probe and keeps the others waiting until the probe's outcome.
    pub async fn wait_until_allowed(&self) -> Admission<'_> {
        loop {
            // Registered before the check, so a change between the check and the wait
            // is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.try_admit() {
                Ok(probe) => return Admission { breaker: self, probe },
                Err(Some(until)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = changed => {}
                    }
                }
                Err(None) => changed.await,
            }
        }
    }

    /// Records the outcome of one delivery. `failure`: a 5xx, a timeout or a connection
    /// error (see [`counts_as_failure`]); the caller decides.
    pub fn record(&self, failure: bool) {
        if !self.cfg.enabled {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock_current();
        match inner.phase {
            Phase::Closed => {
                inner.window.add(now, failure);
                let (total, failures) = inner.window.counts(now);
                if total >= self.cfg.min_requests && f64::from(failures) >= self.cfg.failure_ratio * f64::from(total) {
                    tracing::warn!(
                        failures, outcomes = total, cool_down = ?inner.cool_down,
                        "app failing: circuit breaker open, consumption paused (nothing is dead-lettered)"
                    );
                    self.open(&mut inner, now);
                }
            }
            // Answers to requests sent before the breaker opened.
            Phase::Open { .. } => {}
            Phase::HalfOpen { .. } if failure => {
                inner.cool_down = (inner.cool_down * 2).min(self.cfg.max_cool_down);
                tracing::warn!(cool_down = ?inner.cool_down, "probe failed: circuit breaker open again");
                self.open(&mut inner, now);
            }
            Phase::HalfOpen { .. } => {
                inner.phase = Phase::Closed;
                inner.window.clear();
                inner.cool_down = self.cfg.cool_down;
                tracing::info!("probe succeeded: circuit breaker closed, consumption resumes");
                drop(inner);
                self.changed.notify_waiters();
            }
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        inner.phase = Phase::Open {
            until: now + inner.cool_down,
        };
        inner.window.clear();
        self.changed.notify_waiters();
    }

    /// `Ok(probe id if this is the probe)`, or `Err(Some(until))` while open, `Err(None)`
    /// while another probe is out.
    fn try_admit(&self) -> Result<Option<u64>, Option<Instant>> {
        if !self.cfg.enabled {
            return Ok(None);
        }
        let mut inner = self.lock_current();
        match inner.phase {
            Phase::Closed => Ok(None),
            Phase::Open { until } => Err(Some(until)),
            Phase::HalfOpen { probe: Some(_) } => Err(None),
            Phase::HalfOpen { probe: None } => {
                let id = inner.next_probe;
                inner.next_probe += 1;
                inner.phase = Phase::HalfOpen { probe: Some(id) };
                Ok(Some(id))
            }
        }
    }

    /// The probe's job ended without an outcome: let another delivery probe.
    fn abandon_probe(&self, id: u64) {
        let mut inner = self.lock();
        if inner.phase == (Phase::HalfOpen { probe: Some(id) }) {
            inner.phase = Phase::HalfOpen { probe: None };
            drop(inner);
            self.changed.notify_waiters();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state, with an expired cool-down turned into half-open.
    fn lock_current(&self) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        if let Phase::Open { until } = inner.phase {
            if Instant::now() >= until {
                inner.phase = Phase::HalfOpen { probe: None };
                tracing::info!("circuit breaker half-open: probing the app");
            }
        }
        inner
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::timeout;

    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            window: Duration::from_secs(10),
            min_requests: 20,
            failure_ratio: 0.5,
            cool_down: Duration::from_secs(5),
            max_cool_down: Duration::from_secs(12),
            ..BreakerConfig::default()
        }
    }

    fn record_n(b: &Breaker, n: usize, failure: bool) {
        for _ in 0..n {
            b.record(failure);
        }
    }

    /// A breaker opened at the current instant.
    fn opened() -> Breaker {
        let b = Breaker::new(cfg());
        record_n(&b, 20, true);
        assert_eq!(b.state(), BreakerState::Open);
        b
    }

    /// Whether `wait_until_allowed` gets through within `within`.
    async fn admitted_within(b: &Breaker, within: Duration) -> bool {
        timeout(within, b.wait_until_allowed()).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn opens_when_the_failure_ratio_is_reached_within_the_window() {
        let b = Breaker::new(cfg());
        record_n(&b, 10, false);
        record_n(&b, 9, true);
        assert_eq!(b.state(), BreakerState::Closed);
        b.record(true);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.is_open());
        assert_eq!(b.state().as_gauge(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_below_min_requests() {
        let b = Breaker::new(cfg());
        record_n(&b, 19, true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(admitted_within(&b, Duration::ZERO).await);
    }

    #[tokio::test(start_paused = true)]
    async fn stays_closed_below_the_failure_ratio() {
        let b = Breaker::new(cfg());
        record_n(&b, 60, false);
        record_n(&b, 59, true);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_that_left_the_window_do_not_count() {
        let b = Breaker::new(cfg());
        record_n(&b, 19, true);
        tokio::time::sleep(Duration::from_secs(11)).await;
        record_n(&b, 10, true);
        assert_eq!(b.state(), BreakerState::Closed);
        record_n(&b, 10, true);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn blocks_callers_while_open_then_turns_half_open() {
        let b = opened();
        let start = Instant::now();
        assert!(!admitted_within(&b, Duration::from_millis(4999)).await);
        let admission = b.wait_until_allowed().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(admission.is_probe());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.is_open(), "half-open lets records reach a worker");
        assert_eq!(b.state().as_gauge(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_exactly_one_probe_through() {
        let b = Arc::new(opened());
        tokio::time::sleep(Duration::from_secs(5)).await;
        let probe = b.wait_until_allowed().await;
        assert!(probe.is_probe());
        let waiters: Vec<_> = (0..5)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move {
                    let admission = b.wait_until_allowed().await;
                    admission.is_probe()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(waiters.iter().all(|w| !w.is_finished()), "others keep waiting");

        b.record(false);
        drop(probe);
        for w in waiters {
            assert!(!w.await.unwrap(), "closed: the others pass as ordinary deliveries");
        }
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.state().as_gauge(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_closes_and_resets_the_cool_down() {
        let b = opened();
        let probe = b.wait_until_allowed().await;
        b.record(true);
        drop(probe);
        let probe = b.wait_until_allowed().await;
        b.record(false);
        drop(probe);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(admitted_within(&b, Duration::ZERO).await);

        record_n(&b, 20, true);
        let start = Instant::now();
        let _probe = b.wait_until_allowed().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5), "back to the first cool-down");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_with_a_doubled_capped_cool_down() {
        let b = opened();
        let mut start = Instant::now();
        for expected in [5, 10, 12, 12] {
            let probe = b.wait_until_allowed().await;
            assert_eq!(start.elapsed(), Duration::from_secs(expected));
            start = Instant::now();
            b.record(true);
            drop(probe);
            assert_eq!(b.state(), BreakerState::Open);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_lets_the_next_caller_probe() {
        let b = opened();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let probe = b.wait_until_allowed().await;
        assert!(!admitted_within(&b, Duration::from_secs(1)).await);
        drop(probe);
        let next = timeout(Duration::ZERO, b.wait_until_allowed()).await.unwrap();
        assert!(next.is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_reported_while_open_are_ignored() {
        let b = opened();
        record_n(&b, 100, false);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_disabled_breaker_never_blocks() {
        let b = Breaker::new(BreakerConfig {
            enabled: false,
            ..cfg()
        });
        record_n(&b, 100, true);
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(!b.is_open());
        let admission = timeout(Duration::ZERO, b.wait_until_allowed()).await.unwrap();
        assert!(!admission.is_probe());
    }

    #[test]
    fn waiting_can_run_in_a_spawned_task() {
        fn assert_send<T: Send + 'static>(_: &T) {}
        let b = Arc::new(Breaker::new(cfg()));
        let fut = async move {
            let admission = b.wait_until_allowed().await;
            b.record(false);
            drop(admission);
        };
        assert_send(&fut);
    }

    #[test]
    fn server_errors_timeouts_and_connection_errors_are_failures() {
        let status = |status| Transport::Status {
            status,
            retry_after: None,
        };
        for t in [
            status(500),
            status(503),
            Transport::Timeout,
            Transport::Unreachable("refused".into()),
            Transport::Failed("reset".into()),
        ] {
            assert!(counts_as_failure(&t), "{t:?}");
        }
        for t in [status(200), status(404), status(422), status(429)] {
            assert!(!counts_as_failure(&t), "{t:?}");
        }
    }

    #[test]
    fn validate_names_full_keys() {
        let bad = BreakerConfig {
            window: Duration::ZERO,
            min_requests: 0,
            failure_ratio: 1.5,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(5),
            ..cfg()
        };
        let mut issues = Vec::new();
        bad.validate(&mut issues);
        let keys: Vec<&str> = issues.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "breaker.window",
                "breaker.min_requests",
                "breaker.failure_ratio",
                "breaker.max_cool_down"
            ]
        );
        let mut none = Vec::new();
        BreakerConfig::default().validate(&mut none);
        assert!(none.is_empty(), "{none:?}");
    }

    #[test]
    fn config_reads_durations_from_toml() {
        let c: BreakerConfig = toml::from_str("cool_down = \"2s\"\nfailure_ratio = 1").unwrap();
        assert_eq!(c.cool_down, Duration::from_secs(2));
        assert_eq!(c.failure_ratio, 1.0);
        assert_eq!(c.window, Duration::from_secs(10));
    }
}
