//! When the poll thread reads, holds, or pauses partitions: the in-flight bound.
//!
//! librdkafka reads ahead (up to `queued.max.messages.kbytes`) and pausing a partition throws
//! that prefetch away; it is fetched again on resume. Pausing every time the in-flight limit
//! is reached therefore turns a backlog into a pause/refetch loop. Instead, at the limit the
//! poll thread *holds*: it stops taking records, librdkafka keeps (and stops growing) its
//! prefetch, and reading goes on as soon as workers finish records. Memory stays bounded by
//! the in-flight limit plus the prefetch cap.
//!
//! Holding has one cost: rebalance events wait in librdkafka's queue behind the prefetched
//! records, so a rebalance is noticed only once they are read. While the pipeline reads
//! fast that is soon; when, at the rate it reads, the prefetch would take longer than
//! [`MAX_PREFETCH_DRAIN`] (a slow or stuck app), partitions are paused — which drops the
//! prefetch and lets events through — and resume below the resume threshold.

use std::time::{Duration, Instant};

/// Longest a full prefetch may take to be read at the current rate before pausing.
pub const MAX_PREFETCH_DRAIN: Duration = Duration::from_secs(2);
/// How long the read rate is measured at the limit before deciding to pause.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);

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
    paused: bool,
    /// Since the limit was reached (and in-flight has not fallen to the resume level):
    /// when the current rate window started and the bytes read since.
    window: Option<(Instant, usize)>,
}

impl Pressure {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            paused: false,
            window: None,
        }
    }

    /// Decides this turn from the records and bytes in flight.
    pub fn update(&mut self, now: Instant, records: usize, bytes: usize) -> Flow {
        let l = &self.limits;
        let low = records <= l.resume_records && bytes <= l.resume_bytes;
        if low {
            self.window = None;
            self.paused = false;
        }
        if self.paused {
            return Flow::Paused;
        }
        if records < l.max_records && bytes < l.max_bytes {
            return Flow::Read;
        }
        let (since, read) = *self.window.get_or_insert((now, 0));
        let elapsed = now.saturating_duration_since(since);
        if elapsed < RATE_WINDOW {
            return Flow::Hold;
        }
        // Bytes read per MAX_PREFETCH_DRAIN at the rate of this window.
        let drained = read as f64 * MAX_PREFETCH_DRAIN.as_secs_f64() / elapsed.as_secs_f64();
        if drained < l.prefetch_bytes as f64 {
            self.paused = true;
            self.window = None;
            Flow::Paused
        } else {
            self.window = Some((now, 0));
            Flow::Hold
        }
    }

    /// A record of this size was taken from librdkafka.
    pub fn on_read(&mut self, bytes: usize) {
        if let Some((_, read)) = &mut self.window {
            *read += bytes;
        }
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
        let mut p = Pressure::new(LIMITS);
        let t0 = Instant::now();
        assert_eq!(p.update(t0, 0, 0), Flow::Read);
        assert_eq!(p.update(t0, 99, 99_999), Flow::Read);
    }

    #[test]
    fn at_either_limit_the_loop_holds_instead_of_pausing() {
        let mut p = Pressure::new(LIMITS);
        let t0 = Instant::now();
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 500), 60, 100_000), Flow::Hold);
        assert_eq!(p.update(ms(t0, 600), 99, 0), Flow::Read, "not paused");
    }

    #[test]
    fn a_pipeline_that_reads_its_prefetch_quickly_keeps_holding() {
        let mut p = Pressure::new(LIMITS);
        let t0 = Instant::now();
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        // 6,000 bytes in a second: the 10,000-byte prefetch drains in under 2 s.
        for i in 1..=60 {
            p.on_read(100);
            assert_eq!(p.update(ms(t0, i * 16), 100, 0), Flow::Hold);
        }
        assert_eq!(p.update(ms(t0, 1000), 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 1001), 99, 0), Flow::Read, "not paused");
    }

    #[test]
    fn a_slow_pipeline_pauses_after_the_rate_window_and_resumes_at_the_low_water_mark() {
        let mut p = Pressure::new(LIMITS);
        let t0 = Instant::now();
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        p.on_read(100); // 100 bytes a second: the prefetch would take 200 s
        assert_eq!(p.update(ms(t0, 999), 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 1000), 100, 0), Flow::Paused);
        // Stays paused above the resume level, even below the limit.
        assert_eq!(p.update(ms(t0, 2000), 51, 0), Flow::Paused);
        assert_eq!(p.update(ms(t0, 3000), 50, 50_001), Flow::Paused);
        assert_eq!(p.update(ms(t0, 4000), 50, 50_000), Flow::Read);
    }

    #[test]
    fn a_stuck_pipeline_pauses_after_the_rate_window() {
        let mut p = Pressure::new(LIMITS);
        let t0 = Instant::now();
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 1000), 100, 0), Flow::Paused);
    }

    #[test]
    fn falling_to_the_resume_level_restarts_the_rate_window() {
        let mut p = Pressure::new(LIMITS);
        let t0 = Instant::now();
        assert_eq!(p.update(t0, 100, 0), Flow::Hold);
        assert_eq!(p.update(ms(t0, 900), 10, 0), Flow::Read);
        assert_eq!(p.update(ms(t0, 950), 100, 0), Flow::Hold);
        assert_eq!(
            p.update(ms(t0, 1100), 100, 0),
            Flow::Hold,
            "a new window started at 950 ms"
        );
        assert_eq!(p.update(ms(t0, 1950), 100, 0), Flow::Paused);
    }
}
