//! When the poll thread reads, holds, or pauses partitions: the in-flight bound.
//!
//! librdkafka reads ahead (up to `queued.max.messages.kbytes`) and pausing a partition throws
//! that prefetch away; it is fetched again on resume. Pausing every time the in-flight limit
//! is reached therefore turns a backlog into a pause/refetch loop. Instead, at the limit the
//! poll thread *holds*: it stops taking records, librdkafka keeps (and stops growing) its
//! prefetch, and reading goes on once workers have finished a refill's worth of records
//! ([`REFILL_DIVISOR`]): one wake-up of the poll thread per refill, not one per finished
//! record. Memory stays bounded by the in-flight limit plus the prefetch cap.
//!
//! Holding has one cost: rebalance events wait in librdkafka's queue behind the prefetched
//! records, so a rebalance is noticed only once they are read. While the pipeline reads
//! fast that is soon; when, at the rate it reads, the prefetch would take longer than
//! [`MAX_PREFETCH_DRAIN`] (a slow or stuck app), partitions are paused — which drops the
//! prefetch and lets events through — and resume below the resume threshold.
//!
//! Fairness: librdkafka returns records partition by partition, in chunks of up to
//! `max.partition.fetch.bytes`. While the pipeline is slow, whichever partition comes first
//! would take the whole in-flight window at every resume and the others would wait. So while
//! it is slow, each partition may hold only its share of the record limit: a partition at
//! its share is paused on its own and resumes below the resume threshold of it. While the
//! pipeline is fast nothing is capped, because every prefetched record is read anyway and
//! pausing would only throw prefetched records away.

use std::time::{Duration, Instant};

/// Longest a full prefetch may take to be read at the current rate before pausing.
///
/// 10 s: a rebalance is noticed at most this late while the pipeline holds (the group waits
/// for this member's revoke that long; far below `max.poll.interval.ms`). It was 2 s, which
/// judged a healthy single-mode pipeline of small records "slow" (a 16 MB prefetch of 256 B
/// records drains in 2 s only above 32k records/s): its partitions were then capped at their
/// share, and every cap dropped a fetched MiB to use a few dozen records, so the pipeline
/// really became slow — 4–6k instead of 24k records/s (BENCHMARKS.md, "Profile (issue 10)").
pub const MAX_PREFETCH_DRAIN: Duration = Duration::from_secs(10);
/// How long the read rate is measured at the limit before deciding to pause.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

/// Holding at the limit ends once 1/16 of it (and at least one record) is free again: a
/// thread wake-up and a poll per refill instead of per finished record (at 1,000 records
/// in flight, reading resumes at 936). With the defaults (1,000 records, 64 workers) far more
/// records than workers stay queued meanwhile, so the workers do not wait on it.
pub const REFILL_DIVISOR: usize = 16;

/// Limits that drive holding and pause/resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_records: usize,
    pub max_bytes: usize,
    pub resume_records: usize,
    pub resume_bytes: usize,
    /// librdkafka's prefetch cap in bytes (`queued.max.messages.kbytes`).
    pub prefetch_bytes: usize,
}

/// What the poll loop does on this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Below the limit: take the next record.
    Read,
    /// At the limit: take nothing, keep librdkafka's prefetch, check again shortly.
    Hold,
    /// Partitions are paused: poll for events only (nothing is delivered while paused).
    Paused,
}

/// Pressure state of the poll loop.
#[derive(Debug)]
pub struct Pressure {
    limits: Limits,
    /// At the limit, and not yet down to the refill target.
    holding: bool,
    paused: bool,
    slow: bool,
    /// The current rate window: when it started, bytes read since, and whether the limit was
    /// reached (or partitions were paused for pressure) in it.
    window: (Instant, usize, bool),
}

impl Pressure {
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            holding: false,
            paused: false,
            slow: false,
            window: (now, 0, false),
        }
    }

    /// Decides this turn from the records and bytes in flight.
    pub fn update(&mut self, now: Instant, records: usize, bytes: usize) -> Flow {
        let l = &self.limits;
        let full = records >= l.max_records || bytes >= l.max_bytes;
        let (target_records, target_bytes) = self.hold_target();
        self.holding = full || (self.holding && (records > target_records || bytes > target_bytes));
        if records <= l.resume_records && bytes <= l.resume_bytes {
            self.paused = false;
        }
        let (since, read, saw_full) = &mut self.window;
        // Being paused for pressure is pressure too.
        *saw_full |= full || self.paused;
        let elapsed = now.saturating_duration_since(*since);
        if elapsed >= RATE_WINDOW {
            // Slow: under pressure, and the bytes read per MAX_PREFETCH_DRAIN at this window's
            // rate are less than a full prefetch. A window without pressure is not slow.
            let drained = *read as f64 * MAX_PREFETCH_DRAIN.as_secs_f64() / elapsed.as_secs_f64();
            self.slow = *saw_full && drained < l.prefetch_bytes as f64;
            self.paused |= self.slow && full;
            self.window = (now, 0, false);
        }
        if self.paused {
            Flow::Paused
        } else if self.holding {
            Flow::Hold
        } else {
            Flow::Read
        }
    }

    /// While holding: the most records and bytes in flight at which reading goes on.
    pub fn hold_target(&self) -> (usize, usize) {
        let below = |limit: usize| limit.saturating_sub(1 + limit / REFILL_DIVISOR);
        (below(self.limits.max_records), below(self.limits.max_bytes))
    }

    /// A record of this size was taken from librdkafka.
    pub fn on_read(&mut self, bytes: usize) {
        self.window.1 += bytes;
    }

    /// The last rate window found the pipeline slow: partitions are held to their share.
    pub fn is_slow(&self) -> bool {
        self.slow
    }

    /// The most records one partition may hold while the pipeline is slow, and the count
    /// below which a partition paused at its share resumes.
    pub fn share(&self, partitions: usize) -> (usize, usize) {
        let l = &self.limits;
        let share = (l.max_records / partitions.max(1)).max(1);
        let resume = share * l.resume_records / l.max_records.max(1);
        (share, resume)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_records: 100,
        max_bytes: 100_000,
        resume_records: 50,
        resume_bytes: 50_000,
        prefetch_bytes: 10_000,
    };

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn below_the_limit_the_loop_reads() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        assert_eq!(p.update(t0, 0, 0), Flow::Read);
        assert_eq!(p.update(t0, 99, 99_999), Flow::Read);
    }

    #[test]
    fn at_either_limit_the_loop_holds_instead_of_pausing() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 500), 60, 100_000), Flow::Hold);
        assert_eq!(p.update(ms(t0, 600), 93, 0), Flow::Read, "not paused");
    }

    #[test]
    fn holding_ends_once_a_refill_is_free_not_at_the_first_finished_record() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        // 100 records, 100,000 bytes: read again at 93 records and 93,749 bytes.
        assert_eq!(p.hold_target(), (93, 93_749));
        assert_eq!(p.update(t0, 99, 0), Flow::Read, "below the limit, not holding yet");
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 1), 99, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 2), 94, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 3), 93, 93_750), Flow::Hold, "bytes above their target");
        assert_eq!(p.update(ms(t0, 4), 93, 93_749), Flow::Read);
        assert_eq!(p.update(ms(t0, 5), 99, 0), Flow::Read, "reads up to the limit again");
        assert_eq!(p.update(ms(t0, 6), 50, 100_000), Flow::Hold, "full by bytes");
        assert_eq!(p.update(ms(t0, 7), 50, 99_000), Flow::Hold);
        assert_eq!(p.update(ms(t0, 8), 50, 0), Flow::Read);
        // A limit of one record: reading goes on as soon as it is finished.
        let one = Pressure::new(
            Limits {
                max_records: 1,
                ..LIMITS
            },
            t0,
        );
        assert_eq!(one.hold_target().0, 0);
        let zero = Pressure::new(
            Limits {
                max_records: 0,
                max_bytes: 0,
                ..LIMITS
            },
            t0,
        );
        assert_eq!(zero.hold_target(), (0, 0));
    }

    #[test]
    fn a_pipeline_that_reads_its_prefetch_quickly_keeps_holding() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        // 6,000 bytes in a second: the 10,000-byte prefetch drains in under 2 s.
        for i in 1..=60 {
            p.on_read(100);
            assert_eq!(p.update(ms(t0, i * 16), 100, 0), Flow::Hold);
        }
        assert_eq!(p.update(ms(t0, 1000), 100, 0), Flow::Hold);
        assert!(!p.is_slow());
        assert_eq!(p.update(ms(t0, 1001), 90, 0), Flow::Read, "not paused");
    }

    #[test]
    fn a_pipeline_that_needs_seconds_for_its_prefetch_is_not_slow_yet() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        // 1,500 bytes a second: the 10,000-byte prefetch takes 6.7 s, within MAX_PREFETCH_DRAIN
        // (small records at a healthy record rate look like this).
        p.on_read(1_500);
        assert_eq!(p.update(ms(t0, 1000), 100, 0), Flow::Hold);
        assert!(!p.is_slow());
        // 900 bytes a second: 11 s, too long: slow.
        p.on_read(900);
        assert_eq!(p.update(ms(t0, 2000), 100, 0), Flow::Paused);
        assert!(p.is_slow());
    }

    #[test]
    fn a_slow_pipeline_pauses_after_the_rate_window_and_resumes_at_the_low_water_mark() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        p.on_read(100); // 100 bytes a second: the prefetch would take 200 s
        assert_eq!(p.update(ms(t0, 999), 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 1000), 100, 0), Flow::Paused);
        assert!(p.is_slow());
        // Stays paused above the resume level, even below the limit.
        assert_eq!(p.update(ms(t0, 1500), 51, 0), Flow::Paused);
        assert_eq!(p.update(ms(t0, 1800), 50, 50_001), Flow::Paused);
        assert_eq!(p.update(ms(t0, 1900), 50, 50_000), Flow::Read);
        assert!(p.is_slow(), "still slow until a window says otherwise");
    }

    #[test]
    fn a_stuck_pipeline_pauses_after_the_rate_window() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 1000), 100, 0), Flow::Paused);
    }

    #[test]
    fn a_slow_window_below_the_limit_does_not_pause() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        assert_eq!(p.update(ms(t0, 10), 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 1000), 80, 0), Flow::Read);
        assert!(p.is_slow(), "the limit was reached in a window that read little");
    }

    #[test]
    fn a_window_without_pressure_or_with_a_fast_rate_is_not_slow() {
        let t0 = Instant::now();
        let mut p = Pressure::new(LIMITS, t0);
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 1000), 100, 0), Flow::Paused);
        assert_eq!(p.update(ms(t0, 1500), 60, 0), Flow::Paused);
        assert_eq!(p.update(ms(t0, 2000), 10, 0), Flow::Read);
        assert!(p.is_slow(), "paused for pressure for most of the window");
        // Idle for a window: nothing to be fair about.
        assert_eq!(p.update(ms(t0, 3000), 10, 0), Flow::Read);
        assert!(!p.is_slow());
        // Under pressure again, but reading 10,000 bytes a second.
        assert_eq!(p.update(ms(t0, 3100), 100, 0), Flow::Hold);
        p.on_read(10_000);
        assert_eq!(p.update(ms(t0, 4000), 100, 0), Flow::Hold);
        assert!(!p.is_slow());
    }

    #[test]
    fn each_partition_s_share_splits_the_record_limit() {
        let p = Pressure::new(LIMITS, Instant::now());
        assert_eq!(p.share(1), (100, 50));
        assert_eq!(p.share(3), (33, 16));
        assert_eq!(p.share(0), (100, 50));
        assert_eq!(p.share(1000), (1, 0));
    }
}
