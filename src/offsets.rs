//! Offset tracker: which offsets are finished, per partition, and what is safe to commit.
//!
//! Workers finish records out of order. For each assigned partition the tracker keeps the
//! set of read-but-unfinished offsets; the commit position is the smallest unfinished
//! offset, or the highest read offset + 1 when nothing is unfinished. Offsets may have gaps
//! (compaction, transaction markers), so nothing assumes `offset + 1` exists.
//!
//! Each assignment of a partition gets a fresh generation. A completion tagged with an
//! older generation (work that finished after its partition was revoked) is ignored, so it
//! can never move a newer assignment's commit position.
//!
//! A revoke drain blocks in [`OffsetTracker::wait_finished`] and is woken when a partition's
//! last unfinished record is finished; finishing costs nothing extra while nobody waits.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

#[derive(Debug, Default)]
struct PartitionState {
    generation: u64,
    /// Offsets read and not yet finished, with their record timestamps (ms).
    pending: BTreeMap<i64, Option<i64>>,
    /// Highest offset read + 1.
    next: Option<i64>,
    /// First offset read under this assignment (where consumption resumed).
    start: Option<i64>,
    /// Timestamp of the last record read.
    last_timestamp: Option<i64>,
    /// Last position the broker confirmed as committed.
    committed: Option<i64>,
    /// Partition end (high watermark), refreshed by the lag monitor.
    high_watermark: Option<i64>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        self.pending.keys().next().copied().or(self.next)
    }

    /// High watermark minus the committed position (or where reading started).
    fn lag(&self) -> Option<i64> {
        let hi = self.high_watermark?;
        let from = self.committed.or(self.start).unwrap_or(hi);
        Some((hi - from).max(0))
    }

    /// Age of the oldest unfinished record; with nothing unfinished but lag left, the age of
    /// the last record read (an upper bound for the oldest unread one).
    fn lag_seconds(&self, now_ms: i64) -> f64 {
        let oldest = match self.pending.values().next() {
            Some(ts) => *ts,
            None if self.lag().unwrap_or(0) > 0 => self.last_timestamp,
            None => None,
        };
        oldest.map_or(0.0, |ts| (now_ms - ts).max(0) as f64 / 1000.0)
    }
}

/// A point-in-time view of one partition, for status and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionView {
    pub tp: TopicPartition,
    /// Next offset to read, as far as the sidecar has read.
    pub next: Option<i64>,
    /// Position that would be committed now.
    pub position: Option<i64>,
    /// Last position confirmed committed.
    pub committed: Option<i64>,
    /// Records read and not finished.
    pub pending: usize,
    /// Partition end offset, when known.
    pub high_watermark: Option<i64>,
    /// High watermark minus committed position, when known.
    pub lag: Option<i64>,
    /// Age of the oldest unfinished record in seconds (0 when none).
    pub lag_seconds: f64,
}

/// Shared by the poll thread (reads, commits) and the workers (finish).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Mutex<HashMap<TopicPartition, PartitionState>>,
    generations: AtomicU64,
    /// Threads in `wait_finished` (changed with `partitions` locked), and their wake-up.
    drain_waiters: AtomicUsize,
    drained: Condvar,
}

impl OffsetTracker {
    fn lock(&self) -> MutexGuard<'_, HashMap<TopicPartition, PartitionState>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Starts tracking newly assigned partitions, each under a new generation.
    pub fn assign(&self, tps: &[TopicPartition]) {
        let mut parts = self.lock();
        for tp in tps {
            let state = PartitionState {
                generation: self.new_generation(),
                ..Default::default()
            };
            parts.insert(tp.clone(), state);
        }
    }

    /// Registers a record that was read; returns the generation to tag its work with.
    pub fn read(&self, tp: &TopicPartition, offset: i64, timestamp_ms: Option<i64>) -> u64 {
        let mut parts = self.lock();
        let state = parts.entry(tp.clone()).or_insert_with(|| PartitionState {
            generation: self.new_generation(),
            ..Default::default()
        });
        debug_assert!(!state.pending.contains_key(&offset), "offset {offset} read twice");
        state.pending.insert(offset, timestamp_ms);
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
        state.start.get_or_insert(offset);
        if timestamp_ms.is_some() {
            state.last_timestamp = timestamp_ms;
        }
        state.generation
    }

    /// Marks a record finished. Returns false when its partition was revoked since (ignored).
    pub fn finish(&self, tp: &TopicPartition, offset: i64, generation: u64) -> bool {
        let mut parts = self.lock();
        match parts.get_mut(tp) {
            Some(state) if state.generation == generation => {
                let removed = state.pending.remove(&offset).is_some();
                if removed && state.pending.is_empty() && self.drain_waiters.load(Ordering::Relaxed) > 0 {
                    self.drained.notify_all();
                }
                removed
            }
            _ => false,
        }
    }

    /// Whether this record was read under the current assignment and is not finished yet.
    pub fn is_unfinished(&self, tp: &TopicPartition, offset: i64, generation: u64) -> bool {
        self.lock()
            .get(tp)
            .is_some_and(|s| s.generation == generation && s.pending.contains_key(&offset))
    }

    /// Blocks until the given partitions have no unfinished records or `deadline()` has
    /// passed; returns how many are left. `deadline` is read again on every wake-up, so it
    /// may move earlier: whoever moves it calls [`OffsetTracker::wake_waiters`].
    pub fn wait_finished(&self, tps: &[TopicPartition], deadline: impl Fn() -> Instant) -> usize {
        let mut parts = self.lock();
        self.drain_waiters.fetch_add(1, Ordering::Relaxed);
        let left = loop {
            let left: usize = tps.iter().filter_map(|tp| parts.get(tp)).map(|s| s.pending.len()).sum();
            let now = Instant::now();
            let until = deadline();
            if left == 0 || now >= until {
                break left;
            }
            parts = match self.drained.wait_timeout(parts, until - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        };
        self.drain_waiters.fetch_sub(1, Ordering::Relaxed);
        left
    }

    /// Wakes every [`OffsetTracker::wait_finished`] so that it reads its deadline again.
    pub fn wake_waiters(&self) {
        let _parts = self.lock();
        self.drained.notify_all();
    }

    /// Whether work tagged with this generation still belongs to a current assignment.
    pub fn is_current(&self, tp: &TopicPartition, generation: u64) -> bool {
        self.lock().get(tp).is_some_and(|s| s.generation == generation)
    }

    /// Unfinished records in the given partitions.
    pub fn unfinished(&self, tps: &[TopicPartition]) -> usize {
        let parts = self.lock();
        tps.iter().filter_map(|tp| parts.get(tp)).map(|s| s.pending.len()).sum()
    }

    /// Positions that moved past the last confirmed commit.
    pub fn positions_to_commit(&self) -> Vec<(TopicPartition, i64)> {
        let parts = self.lock();
        let mut out: Vec<_> = parts
            .iter()
            .filter_map(|(tp, s)| {
                let pos = s.position()?;
                (s.committed.is_none_or(|c| pos > c)).then(|| (tp.clone(), pos))
            })
            .collect();
        out.sort();
        out
    }

    /// Records positions the broker confirmed.
    pub fn committed(&self, positions: &[(TopicPartition, i64)]) {
        let mut parts = self.lock();
        for (tp, pos) in positions {
            if let Some(state) = parts.get_mut(tp) {
                state.committed = Some(state.committed.map_or(*pos, |c| c.max(*pos)));
            }
        }
    }

    /// Stops tracking revoked partitions; returns their final commit positions (those not
    /// confirmed committed already).
    pub fn revoke(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let mut parts = self.lock();
        tps.iter()
            .filter_map(|tp| {
                let state = parts.remove(tp)?;
                let pos = state.position()?;
                state.committed.is_none_or(|c| pos > c).then(|| (tp.clone(), pos))
            })
            .collect()
    }

    /// Records a partition's high watermark (from the lag monitor).
    pub fn set_high_watermark(&self, tp: &TopicPartition, high: i64) {
        if let Some(state) = self.lock().get_mut(tp) {
            state.high_watermark = Some(high);
        }
    }

    /// The tracked (assigned) partitions.
    pub fn partitions(&self) -> Vec<TopicPartition> {
        let mut tps: Vec<_> = self.lock().keys().cloned().collect();
        tps.sort();
        tps
    }

    /// All tracked partitions, sorted.
    pub fn snapshot(&self) -> Vec<PartitionView> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let parts = self.lock();
        let mut out: Vec<_> = parts
            .iter()
            .map(|(tp, s)| PartitionView {
                tp: tp.clone(),
                next: s.next,
                position: s.position(),
                committed: s.committed,
                pending: s.pending.len(),
                high_watermark: s.high_watermark,
                lag: s.lag(),
                lag_seconds: s.lag_seconds(now_ms),
            })
            .collect();
        out.sort_by(|a, b| a.tp.cmp(&b.tp));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    #[test]
    fn commit_position_is_the_smallest_unfinished_offset() {
        let t = OffsetTracker::default();
        t.assign(&[tp(0)]);
        let g = (0..5).map(|o| t.read(&tp(0), o, None)).last().unwrap();
        assert_eq!(t.positions_to_commit(), vec![(tp(0), 0)]);
        t.finish(&tp(0), 1, g);
        t.finish(&tp(0), 2, g);
        assert_eq!(t.positions_to_commit(), vec![(tp(0), 0)], "0 is still unfinished");
        t.finish(&tp(0), 0, g);
        assert_eq!(t.positions_to_commit(), vec![(tp(0), 3)]);
        t.finish(&tp(0), 4, g);
        t.finish(&tp(0), 3, g);
        assert_eq!(t.positions_to_commit(), vec![(tp(0), 5)]);
    }

    #[test]
    fn gaps_in_offsets_do_not_stall_the_watermark() {
        let t = OffsetTracker::default();
        let g = t.read(&tp(0), 10, None);
        t.read(&tp(0), 13, None);
        t.finish(&tp(0), 10, g);
        assert_eq!(t.positions_to_commit(), vec![(tp(0), 13)]);
        t.finish(&tp(0), 13, g);
        assert_eq!(t.positions_to_commit(), vec![(tp(0), 14)]);
    }

    #[test]
    fn confirmed_positions_are_not_committed_again() {
        let t = OffsetTracker::default();
        let g = t.read(&tp(1), 0, None);
        t.finish(&tp(1), 0, g);
        let p = t.positions_to_commit();
        t.committed(&p);
        assert!(t.positions_to_commit().is_empty());
    }

    #[test]
    fn completions_from_a_revoked_generation_are_ignored() {
        let t = OffsetTracker::default();
        t.assign(&[tp(0)]);
        let old = t.read(&tp(0), 0, None);
        assert_eq!(t.revoke(&[tp(0)]), vec![(tp(0), 0)]);
        t.assign(&[tp(0)]);
        let new = t.read(&tp(0), 0, None);
        assert_ne!(old, new);
        assert!(!t.finish(&tp(0), 0, old));
        assert!(!t.is_current(&tp(0), old));
        assert_eq!(t.unfinished(&[tp(0)]), 1);
        assert!(t.finish(&tp(0), 0, new));
        assert_eq!(t.unfinished(&[tp(0)]), 0);
    }

    #[test]
    fn lag_counts_from_the_committed_position_and_ages_the_oldest_unfinished_record() {
        let t = OffsetTracker::default();
        t.assign(&[tp(0)]);
        let g = t.read(&tp(0), 10, Some(1_000));
        t.read(&tp(0), 11, Some(2_000));
        t.set_high_watermark(&tp(0), 15);
        let v = &t.snapshot()[0];
        assert_eq!(
            v.lag,
            Some(5),
            "nothing committed yet: counted from where reading started"
        );
        assert!(v.lag_seconds > 1_000_000.0, "record timestamps are from 1970");
        t.finish(&tp(0), 10, g);
        t.committed(&[(tp(0), 11)]);
        assert_eq!(t.snapshot()[0].lag, Some(4));
    }

    #[test]
    fn a_revoke_returns_no_position_that_is_committed_already() {
        let t = OffsetTracker::default();
        t.assign(&[tp(0), tp(1)]);
        let g0 = t.read(&tp(0), 0, None);
        let g1 = t.read(&tp(1), 0, None);
        t.finish(&tp(0), 0, g0);
        t.finish(&tp(1), 0, g1);
        t.committed(&[(tp(0), 1)]);
        assert_eq!(t.revoke(&[tp(0), tp(1)]), vec![(tp(1), 1)]);
    }

    #[test]
    fn a_partition_with_nothing_read_has_nothing_to_commit() {
        let t = OffsetTracker::default();
        t.assign(&[tp(2)]);
        assert!(t.positions_to_commit().is_empty());
        assert!(t.revoke(&[tp(2)]).is_empty());
    }

    #[test]
    fn a_revoke_drain_is_woken_when_the_last_record_of_its_partitions_finishes() {
        let t = Arc::new(OffsetTracker::default());
        t.assign(&[tp(0), tp(1)]);
        let g = t.read(&tp(0), 0, None);
        t.read(&tp(0), 1, None);
        t.read(&tp(1), 0, None);
        let finisher = {
            let t = t.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                assert!(t.finish(&tp(0), 1, g));
                std::thread::sleep(std::time::Duration::from_millis(50));
                assert!(t.finish(&tp(0), 0, g));
            })
        };
        let started = Instant::now();
        let far = started + std::time::Duration::from_secs(60);
        assert_eq!(t.wait_finished(&[tp(0)], || far), 0, "partition 1 is not waited for");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "woken, not timed out"
        );
        finisher.join().unwrap();
    }

    #[test]
    fn a_revoke_drain_reads_its_deadline_again_when_woken() {
        let t = Arc::new(OffsetTracker::default());
        t.assign(&[tp(0)]);
        t.read(&tp(0), 0, None);
        let deadline = Arc::new(Mutex::new(Instant::now() + std::time::Duration::from_secs(60)));
        let shortener = {
            let (t, deadline) = (t.clone(), deadline.clone());
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                *deadline.lock().unwrap() = Instant::now();
                t.wake_waiters();
            })
        };
        let started = Instant::now();
        assert_eq!(t.wait_finished(&[tp(0)], || *deadline.lock().unwrap()), 1);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "the moved deadline ended the wait"
        );
        shortener.join().unwrap();
    }

    #[test]
    fn is_unfinished_only_for_a_pending_record_of_the_current_generation() {
        let t = OffsetTracker::default();
        t.assign(&[tp(0)]);
        let g = t.read(&tp(0), 0, None);
        assert!(t.is_unfinished(&tp(0), 0, g));
        assert!(!t.is_unfinished(&tp(0), 0, g + 1));
        assert!(!t.is_unfinished(&tp(0), 1, g));
        t.finish(&tp(0), 0, g);
        assert!(!t.is_unfinished(&tp(0), 0, g));
    }
}
