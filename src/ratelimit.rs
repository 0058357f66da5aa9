//! Rate limiting: the gate every delivery passes just before it is sent to the app.
//!
//! A delivery may start only when four conditions hold, checked in this order:
//!
//! 1. The app has not asked for a pause. When it answers 429 or 503 with `Retry-After`, no
//!    delivery starts before that instant (capped by `max_retry_after`), whichever worker
//!    it was that got the answer.
//! 2. The record's key is within its own rate (`per_key_records_per_second`), if that limit
//!    is on. Only the busy key waits; other keys and records without a key pass.
//! 3. The whole sidecar is within its rate (`records_per_second`, with `burst`). A batch of
//!    `n` records takes `n` permits; a batch larger than the burst takes them in pieces,
//!    so it waits longer but never forever.
//! 4. A concurrency slot is free. The number of slots adapts to the app (AIMD, as in TCP):
//!    it starts at `pipeline.workers`; each 429 or 503 multiplies it by `decrease_factor`
//!    (half by default, never below `min_concurrency`), at most once per
//!    `decrease_interval` so that one wave of 429s counts as one signal; after that, every
//!    run of `limit` successful deliveries adds one slot, back up to `pipeline.workers`.
//!    Requests already in flight when the limit drops are not cancelled: new ones wait
//!    until the number in flight is below the new limit.
//!
//! Per-key state is bounded by count: keys are tracked by a 64-bit keyed hash (8 bytes each,
//! however long the record key), at most `per_key_max_keys` of them; states that are as good
//! as fresh are dropped every second. When the table is full, records of untracked keys share
//! one extra state: together they get one key's rate, so no key ever exceeds its rate, memory
//! stays bounded under a flood of distinct keys, and nothing waits forever (the table frees up
//! as keys go idle). Two keys with the same hash (odds about n²/2⁶⁵) share a rate the same way.
//!
//! Waiting happens inside the worker that holds the record: a worker slot stays taken, so
//! the pipeline's in-flight bound fills up and the partitions pause. Nothing is spawned
//! and nothing is queued besides the records already in memory. Timeouts, connection
//! errors and other 5xx do not change the limits here: the circuit breaker handles them.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{InsufficientCapacity, NotUntil, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::rate_limit::MAX_RATE;
pub use crate::config::RateLimitConfig;
use crate::retry::Transport;

/// How often idle per-key states are dropped: keeps memory bounded by the keys seen lately.
const KEY_CLEANUP_INTERVAL: Duration = Duration::from_secs(1);

/// Governor's clock, on tokio's time: paused-time tests and the sleeps below agree on "now".
#[derive(Debug, Clone)]
struct TokioClock {
    origin: Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let elapsed = self.origin.elapsed().as_nanos();
        Nanos::from(u64::try_from(elapsed).unwrap_or(u64::MAX))
    }
}

type DirectLimiter = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;
type KeyedLimiter = governor::RateLimiter<u64, BoundedKeys, TokioClock, NoOpMiddleware<Nanos>>;
type Check = Result<Result<(), NotUntil<Nanos>>, InsufficientCapacity>;

/// Per-key GCRA states (theoretical arrival times, in ns since the limiter's start), keyed by
/// the hash of the record key, at most `max` of them; keys beyond share `overflow`.
#[derive(Debug)]
struct BoundedKeys {
    max: usize,
    inner: Mutex<KeyStates>,
}

#[derive(Debug, Default)]
struct KeyStates {
    /// 0 means "no state" (as in governor's own stores).
    by_key: HashMap<u64, u64>,
    overflow: u64,
    /// The table was full and the overflow state was used (logged once until it empties).
    overflowed: bool,
}

impl BoundedKeys {
    fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            inner: Mutex::new(KeyStates::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, KeyStates> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl StateStore for BoundedKeys {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut states = self.lock();
        let KeyStates {
            by_key,
            overflow,
            overflowed,
        } = &mut *states;
        let full = by_key.len() >= self.max;
        let slot = match by_key.get_mut(key) {
            Some(tat) => tat,
            None if full => {
                if !std::mem::replace(overflowed, true) {
                    tracing::warn!(
                        keys = self.max,
                        "per-key rate table full: records of further keys share one key's rate until \
                         keys go idle; raise rate_limit.per_key_max_keys if this is normal traffic"
                    );
                }
                overflow
            }
            None => by_key.entry(*key).or_insert(0),
        };
        let previous = (*slot != 0).then(|| Nanos::from(*slot));
        match f(previous) {
            Ok((result, tat)) => {
                // A stored 0 would read back as "no state"; 1 ns later is the same state.
                *slot = u64::from(tat).max(1);
                Ok(result)
            }
            Err(e) => {
                if previous.is_none() && !full {
                    by_key.remove(key);
                }
                Err(e)
            }
        }
    }
}

impl ShrinkableKeyedStateStore<u64> for BoundedKeys {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = u64::from(drop_below);
        let mut states = self.lock();
        states.by_key.retain(|_, tat| *tat > drop_below);
        if states.by_key.len() < self.max {
            states.overflowed = false;
        }
    }

    fn shrink_to_fit(&self) {
        self.lock().by_key.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.lock().by_key.len()
    }

    fn is_empty(&self) -> bool {
        self.lock().by_key.is_empty()
    }
}

/// A GCRA limiter and its burst (the most cells one check may take).
#[derive(Debug)]
struct Limit<L> {
    limiter: L,
    burst: u32,
}

/// `rate` per second with `burst` (0: one second's worth); `None` when the rate is 0.
fn quota(rate: f64, burst: u32) -> Option<(Quota, u32)> {
    if !(rate.is_finite() && rate > 0.0) {
        return None;
    }
    let burst = if burst == 0 { (rate.ceil() as u32).max(1) } else { burst };
    let period = Duration::from_secs_f64(1.0 / rate.min(MAX_RATE));
    let quota = Quota::with_period(period)?.allow_burst(NonZeroU32::new(burst)?);
    Some((quota, burst))
}

/// Takes `n` cells, at most `burst` per check, sleeping until each piece conforms.
async fn take_cells(clock: &TokioClock, n: u32, burst: u32, check: impl Fn(NonZeroU32) -> Check) {
    let mut left = n;
    while let Some(piece) = NonZeroU32::new(left.min(burst)) {
        loop {
            match check(piece) {
                Ok(Ok(())) => break,
                Ok(Err(not_until)) => {
                    tokio::time::sleep(not_until.wait_time_from(clock.now())).await;
                }
                // Cannot happen: a piece is never larger than the burst.
                Err(_) => break,
            }
        }
        left -= piece.get();
    }
}

/// The adaptive concurrency limit: a semaphore whose size moves with AIMD.
///
/// Shrinking removes free slots at once; slots in use when the limit drops are "debt",
/// destroyed as they come back instead of being returned.
#[derive(Debug)]
struct Concurrency {
    slots: Arc<Semaphore>,
    aimd: Mutex<Aimd>,
    min: usize,
    max: usize,
    factor: f64,
    interval: Duration,
}

#[derive(Debug)]
struct Aimd {
    limit: usize,
    debt: usize,
    successes: usize,
    last_decrease: Option<Instant>,
}

impl Concurrency {
    fn new(max: usize, cfg: &RateLimitConfig) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            aimd: Mutex::new(Aimd {
                limit: max,
                debt: 0,
                successes: 0,
                last_decrease: None,
            }),
            min: cfg.min_concurrency.clamp(1, max),
            max,
            factor: cfg.decrease_factor,
            interval: cfg.decrease_interval,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Aimd> {
        self.aimd.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn limit(&self) -> usize {
        self.lock().limit
    }

    /// Waits for a free slot (FIFO). `None` only if the semaphore were closed, which never happens.
    async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    fn release(&self, slot: OwnedSemaphorePermit) {
        let mut aimd = self.lock();
        if aimd.debt > 0 {
            aimd.debt -= 1;
            slot.forget();
        } else {
            drop(slot);
        }
    }

    /// Multiplicative decrease, at most once per interval.
    fn decrease(&self, now: Instant) {
        let mut aimd = self.lock();
        if aimd
            .last_decrease
            .is_some_and(|at| now.duration_since(at) < self.interval)
        {
            return;
        }
        let target = ((aimd.limit as f64 * self.factor) as usize).max(self.min);
        aimd.successes = 0;
        if target >= aimd.limit {
            return;
        }
        aimd.last_decrease = Some(now);
        let cut = aimd.limit - target;
        aimd.limit = target;
        aimd.debt += cut - self.slots.forget_permits(cut);
        tracing::info!(
            limit = target,
            "app pushed back (429/503); lowering delivery concurrency"
        );
    }

    /// Additive increase: one slot per `limit` successes.
    fn increase(&self) {
        let mut aimd = self.lock();
        if aimd.limit >= self.max {
            return;
        }
        aimd.successes += 1;
        if aimd.successes < aimd.limit {
            return;
        }
        aimd.successes = 0;
        aimd.limit += 1;
        if aimd.debt > 0 {
            aimd.debt -= 1;
        } else {
            self.slots.add_permits(1);
        }
        if aimd.limit == self.max {
            tracing::info!(
                limit = aimd.limit,
                "app healthy again; delivery concurrency back to full"
            );
        }
    }
}

/// The right to start one delivery. Keep it until the app has answered: dropping it frees
/// the concurrency slot.
#[must_use = "the concurrency slot is released when the permit is dropped"]
#[derive(Debug)]
pub struct Permit {
    slot: Option<(Arc<Concurrency>, OwnedSemaphorePermit)>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some((concurrency, slot)) = self.slot.take() {
            concurrency.release(slot);
        }
    }
}

/// The app gate: global and per-key rates, the adaptive concurrency limit and the
/// `Retry-After` pause. Shared by all workers.
#[derive(Debug)]
pub struct RateLimiter {
    clock: TokioClock,
    global: Option<Limit<DirectLimiter>>,
    per_key: Option<Limit<KeyedLimiter>>,
    /// Hashes record keys for the per-key states (keyed per process: collisions cannot be
    /// chosen by producers).
    key_hasher: RandomState,
    concurrency: Option<Arc<Concurrency>>,
    /// No delivery starts before this instant (the app's `Retry-After`).
    pause_until: Mutex<Option<Instant>>,
    max_retry_after: Duration,
    workers: usize,
    last_key_cleanup: Mutex<Instant>,
    waited_micros: AtomicU64,
}

impl RateLimiter {
    /// A limiter for a pool of `workers` concurrent deliveries (`pipeline.workers`).
    pub fn new(cfg: &RateLimitConfig, workers: usize) -> Self {
        let workers = workers.max(1);
        let clock = TokioClock { origin: Instant::now() };
        let global = quota(cfg.records_per_second, cfg.burst).map(|(q, burst)| Limit {
            limiter: DirectLimiter::direct_with_clock(q, clock.clone()),
            burst,
        });
        let per_key = quota(cfg.per_key_records_per_second, cfg.per_key_burst).map(|(q, burst)| Limit {
            limiter: KeyedLimiter::new(q, BoundedKeys::new(cfg.per_key_max_keys), clock.clone()),
            burst,
        });
        Self {
            global,
            per_key,
            key_hasher: RandomState::new(),
            concurrency: cfg.adaptive.then(|| Arc::new(Concurrency::new(workers, cfg))),
            pause_until: Mutex::new(None),
            max_retry_after: cfg.max_retry_after,
            workers,
            last_key_cleanup: Mutex::new(clock.origin),
            waited_micros: AtomicU64::new(0),
            clock,
        }
    }

    /// Waits until a delivery of `n` records (1 in single mode) with this record key may
    /// start. Pass `None` for records without a key and for batches of mixed keys.
    pub async fn acquire(&self, key: Option<&[u8]>, n: u32) -> Permit {
        let started = Instant::now();
        self.wait_for_pause().await;
        if let (Some(per_key), Some(key)) = (&self.per_key, key) {
            self.forget_idle_keys(&per_key.limiter);
            let key = self.key_hasher.hash_one(key);
            take_cells(&self.clock, n, per_key.burst, |c| per_key.limiter.check_key_n(&key, c)).await;
        }
        if let Some(global) = &self.global {
            take_cells(&self.clock, n, global.burst, |c| global.limiter.check_n(c)).await;
        }
        let slot = match &self.concurrency {
            Some(c) => c.acquire().await.map(|slot| (c.clone(), slot)),
            None => None,
        };
        // The app may have asked for a pause while this delivery waited for its slot.
        self.wait_for_pause().await;
        let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.waited_micros.fetch_add(waited, Ordering::Relaxed);
        Permit { slot }
    }

    /// Feeds one answer of the app to the adaptive limit: 429 and 503 lower it (and set the
    /// pause from `Retry-After`), 2xx raise it. Anything else leaves it alone.
    pub fn on_result(&self, outcome: &Transport) {
        match outcome {
            Transport::Status {
                status: 429 | 503,
                retry_after,
            } => self.on_push_back(*retry_after),
            Transport::Status { status, .. } if (200..300).contains(status) => {
                if let Some(c) = &self.concurrency {
                    c.increase();
                }
            }
            _ => {}
        }
    }

    /// The current number of deliveries allowed at once (`pipeline.workers` when not adaptive).
    pub fn current_limit(&self) -> usize {
        self.concurrency.as_ref().map_or(self.workers, |c| c.limit())
    }

    /// Total time deliveries spent waiting in [`RateLimiter::acquire`], in seconds.
    pub fn wait_seconds_total(&self) -> f64 {
        self.waited_micros.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Record keys with a per-key rate state in memory.
    pub fn tracked_keys(&self) -> usize {
        self.per_key.as_ref().map_or(0, |k| k.limiter.len())
    }

    fn on_push_back(&self, retry_after: Option<Duration>) {
        let Some(concurrency) = &self.concurrency else {
            return;
        };
        let now = Instant::now();
        concurrency.decrease(now);
        let pause = retry_after.unwrap_or_default().min(self.max_retry_after);
        if pause.is_zero() {
            return;
        }
        let mut until = self.pause_until.lock().unwrap_or_else(PoisonError::into_inner);
        *until = (*until).max(Some(now + pause));
    }

    async fn wait_for_pause(&self) {
        loop {
            let until = *self.pause_until.lock().unwrap_or_else(PoisonError::into_inner);
            match until {
                Some(at) if at > Instant::now() => tokio::time::sleep_until(at).await,
                _ => return,
            }
        }
    }

    /// Drops per-key states that are as good as fresh, once per interval, by whichever
    /// delivery comes first (no background task).
    fn forget_idle_keys(&self, limiter: &KeyedLimiter) {
        let Ok(mut last) = self.last_key_cleanup.try_lock() else {
            return;
        };
        if last.elapsed() < KEY_CLEANUP_INTERVAL {
            return;
        }
        *last = Instant::now();
        let before = limiter.len();
        limiter.retain_recent();
        if limiter.len() * 4 < before {
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    fn cfg() -> RateLimitConfig {
        RateLimitConfig::default()
    }

    fn status(status: u16, retry_after: Option<Duration>) -> Transport {
        Transport::Status { status, retry_after }
    }

    /// Acquires permits one after another for `window`; returns how many were granted.
    async fn count_for(limiter: &RateLimiter, key: Option<&[u8]>, window: Duration) -> u32 {
        let start = Instant::now();
        let mut granted = 0;
        while start.elapsed() < window {
            let _permit = limiter.acquire(key, 1).await;
            granted += 1;
        }
        granted
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_config_never_waits() {
        let limiter = RateLimiter::new(&cfg(), 4);
        let start = Instant::now();
        for _ in 0..10_000 {
            let _permit = limiter.acquire(Some(b"k"), 1).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(limiter.wait_seconds_total(), 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn global_limit_yields_the_configured_rate_over_a_window() {
        let c = RateLimitConfig {
            records_per_second: 200.0,
            burst: 10,
            ..cfg()
        };
        let limiter = RateLimiter::new(&c, 8);
        let granted = count_for(&limiter, None, Duration::from_secs(10)).await;
        // 10 s at 200/s, plus the initial burst.
        assert!((2000..=2011).contains(&granted), "{granted}");
        assert!(limiter.wait_seconds_total() > 9.0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_default_burst_is_one_second_of_rate() {
        let c = RateLimitConfig {
            records_per_second: 50.0,
            ..cfg()
        };
        let limiter = RateLimiter::new(&c, 8);
        let start = Instant::now();
        for _ in 0..50 {
            let _permit = limiter.acquire(None, 1).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        let _permit = limiter.acquire(None, 1).await;
        assert_eq!(start.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_the_burst_is_admitted_in_pieces() {
        let c = RateLimitConfig {
            records_per_second: 100.0,
            burst: 100,
            ..cfg()
        };
        let limiter = RateLimiter::new(&c, 8);
        let start = Instant::now();
        let _permit = limiter.acquire(None, 250).await;
        // 100 at once (the burst), then 150 more at 100/s.
        assert_eq!(start.elapsed(), Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_limit_only_slows_that_key() {
        let c = RateLimitConfig {
            per_key_records_per_second: 10.0,
            per_key_burst: 1,
            ..cfg()
        };
        let limiter = RateLimiter::new(&c, 8);
        let hot = count_for(&limiter, Some(b"hot"), Duration::from_secs(2)).await;
        assert!((20..=21).contains(&hot), "{hot}");

        let start = Instant::now();
        let _hot_is_due = limiter.acquire(Some(b"hot"), 1).await;
        let hot_wait = start.elapsed();
        assert!(hot_wait > Duration::ZERO, "the hot key waits for its rate");

        let start = Instant::now();
        let _other = limiter.acquire(Some(b"cold"), 1).await;
        let _no_key = limiter.acquire(None, 1).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "other keys do not wait");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_forgotten() {
        let c = RateLimitConfig {
            per_key_records_per_second: 10.0,
            per_key_burst: 1,
            ..cfg()
        };
        let limiter = RateLimiter::new(&c, 8);
        for i in 0..1000u32 {
            let _permit = limiter.acquire(Some(&i.to_be_bytes()), 1).await;
        }
        assert_eq!(limiter.tracked_keys(), 1000);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _permit = limiter.acquire(Some(b"new"), 1).await;
        assert!(limiter.tracked_keys() <= 1, "{}", limiter.tracked_keys());
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_states_are_bounded_by_count_and_untracked_keys_share_one_rate() {
        let c = RateLimitConfig {
            per_key_records_per_second: 1.0,
            per_key_burst: 1,
            per_key_max_keys: 100,
            ..cfg()
        };
        let limiter = RateLimiter::new(&c, 8);
        let start = Instant::now();
        for i in 0..100u32 {
            let _permit = limiter.acquire(Some(&i.to_be_bytes()), 1).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "100 fresh keys pass at once");
        assert_eq!(limiter.tracked_keys(), 100);
        let _first = limiter.acquire(Some(b"new-1"), 1).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        let _second = limiter.acquire(Some(b"new-2"), 1).await;
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "keys beyond the bound share one key's rate: {:?}",
            start.elapsed()
        );
        assert!(limiter.tracked_keys() <= 100, "{}", limiter.tracked_keys());
        let tracked = Instant::now();
        let _again = limiter.acquire(Some(&7u32.to_be_bytes()), 1).await;
        assert!(
            tracked.elapsed() < Duration::from_secs(2),
            "the table frees up as keys go idle"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_halves_the_limit_and_retry_after_holds_every_start() {
        let limiter = RateLimiter::new(&cfg(), 16);
        assert_eq!(limiter.current_limit(), 16);
        limiter.on_result(&status(429, Some(Duration::from_secs(2))));
        assert_eq!(limiter.current_limit(), 8);

        let start = Instant::now();
        let _permit = limiter.acquire(None, 1).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn one_wave_of_429s_decreases_once() {
        let limiter = RateLimiter::new(&cfg(), 16);
        for _ in 0..16 {
            limiter.on_result(&status(429, None));
        }
        assert_eq!(limiter.current_limit(), 8);
        tokio::time::sleep(Duration::from_secs(1)).await;
        limiter.on_result(&status(503, None));
        assert_eq!(limiter.current_limit(), 4);
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            limiter.on_result(&status(429, None));
        }
        assert_eq!(limiter.current_limit(), 1, "never below min_concurrency");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_capped() {
        let c = RateLimitConfig {
            max_retry_after: Duration::from_secs(5),
            ..cfg()
        };
        let limiter = RateLimiter::new(&c, 4);
        limiter.on_result(&status(503, Some(Duration::from_secs(3600))));
        let start = Instant::now();
        let _permit = limiter.acquire(None, 1).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn other_failures_leave_the_limit_alone() {
        let limiter = RateLimiter::new(&cfg(), 16);
        limiter.on_result(&status(500, Some(Duration::from_secs(9))));
        limiter.on_result(&status(404, None));
        limiter.on_result(&Transport::Timeout);
        limiter.on_result(&Transport::Unreachable("refused".into()));
        assert_eq!(limiter.current_limit(), 16);
        let start = Instant::now();
        let _permit = limiter.acquire(None, 1).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn not_adaptive_ignores_push_back() {
        let c = RateLimitConfig {
            adaptive: false,
            ..cfg()
        };
        let limiter = RateLimiter::new(&c, 16);
        limiter.on_result(&status(429, Some(Duration::from_secs(2))));
        assert_eq!(limiter.current_limit(), 16);
        let start = Instant::now();
        let _permit = limiter.acquire(None, 1).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_recovers_to_workers_after_sustained_success() {
        let limiter = RateLimiter::new(&cfg(), 16);
        for _ in 0..6 {
            limiter.on_result(&status(429, None));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(limiter.current_limit(), 1);
        // One more slot per `limit` successes: 1 + 2 + ... + 15 = 120 to get back to 16.
        for _ in 0..119 {
            limiter.on_result(&status(200, None));
        }
        assert_eq!(limiter.current_limit(), 15);
        limiter.on_result(&status(204, None));
        assert_eq!(limiter.current_limit(), 16);
        for _ in 0..1000 {
            limiter.on_result(&status(200, None));
        }
        assert_eq!(limiter.current_limit(), 16, "never above workers");
    }

    /// Runs `tasks` deliveries of 10 ms each through the limiter; returns the most in flight.
    async fn max_concurrent(limiter: &Arc<RateLimiter>, tasks: usize) -> usize {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (limiter, in_flight, max) = (limiter.clone(), in_flight.clone(), max.clone());
                tokio::spawn(async move {
                    let _permit = limiter.acquire(None, 1).await;
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        max.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_never_exceeds_the_limit() {
        let limiter = Arc::new(RateLimiter::new(&cfg(), 8));
        assert_eq!(max_concurrent(&limiter, 100).await, 8);
        limiter.on_result(&status(429, None));
        assert_eq!(limiter.current_limit(), 4);
        assert_eq!(max_concurrent(&limiter, 100).await, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_in_use_when_the_limit_drops_are_not_handed_out_again() {
        let limiter = Arc::new(RateLimiter::new(&cfg(), 8));
        let held: Vec<Permit> = futures::future::join_all((0..8).map(|_| limiter.acquire(None, 1))).await;
        limiter.on_result(&status(429, None));
        assert_eq!(limiter.current_limit(), 4);
        drop(held);
        assert_eq!(max_concurrent(&limiter, 100).await, 4);
        // Growing again pays the debt first: the semaphore ends at exactly the limit.
        for _ in 0..4 {
            limiter.on_result(&status(200, None));
        }
        assert_eq!(limiter.current_limit(), 5);
        assert_eq!(max_concurrent(&limiter, 100).await, 5);
    }

    #[test]
    fn acquire_can_run_in_a_spawned_task() {
        fn assert_send<T: Send + 'static>(_: &T) {}
        let limiter = Arc::new(RateLimiter::new(&cfg(), 4));
        let fut = async move { limiter.acquire(Some(b"k"), 1).await };
        assert_send(&fut);
    }

    #[test]
    fn validate_names_full_keys() {
        let bad = RateLimitConfig {
            records_per_second: -1.0,
            per_key_records_per_second: f64::NAN,
            min_concurrency: 0,
            decrease_factor: 1.0,
            per_key_max_keys: 0,
            ..cfg()
        };
        let mut issues = Vec::new();
        bad.validate(&mut issues);
        let keys: Vec<&str> = issues.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "rate_limit.records_per_second",
                "rate_limit.per_key_records_per_second",
                "rate_limit.min_concurrency",
                "rate_limit.per_key_max_keys",
                "rate_limit.decrease_factor"
            ]
        );
        let mut none = Vec::new();
        cfg().validate(&mut none);
        assert!(none.is_empty(), "{none:?}");
    }

    #[test]
    fn config_reads_from_toml_with_defaults_and_rejects_unknown_keys() {
        let c: RateLimitConfig = toml::from_str("records_per_second = 200\ndecrease_interval = \"500ms\"").unwrap();
        assert_eq!(c.records_per_second, 200.0);
        assert_eq!(c.decrease_interval, Duration::from_millis(500));
        assert!(c.adaptive);
        assert!(toml::from_str::<RateLimitConfig>("rps = 1.0").is_err());
    }
}
