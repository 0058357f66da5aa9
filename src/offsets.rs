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
//!
//! Lag is counted from what Kafka would hand a restarted member: the group's committed offset
//! (fetched by the lag monitor on assignment and every `admin.lag_interval`, or confirmed by
//! this member's own commits, whichever is further), else where this assignment started
//! reading, else where `auto_offset_reset` starts (the low watermark for `earliest`, the end
//! offset first seen for `latest`) — so a partition paused before its first record was read
//! shows its whole backlog, not 0. Lag in seconds is the age of the oldest record not yet
//! finished: the oldest unfinished record read, or, when nothing of the partition is in
//! flight, the first unread record (its timestamp fetched by the lag monitor).

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
    /// Last position the broker confirmed as committed to this member's own commits.
    committed: Option<i64>,
    /// The group's committed offset as last fetched by the lag monitor: `None` until fetched,
    /// `Some(None)` when the group has committed nothing for this partition.
    group_committed: Option<Option<i64>>,
    /// Partition start (low watermark), refreshed by the lag monitor.
    low_watermark: Option<i64>,
    /// Partition end (high watermark), refreshed by the lag monitor.
    high_watermark: Option<i64>,
    /// With nothing committed: where `auto_offset_reset` starts reading, as first seen.
    reset_origin: Option<i64>,
    /// First record at or after a given offset and its timestamp (ms), fetched by the lag
    /// monitor while nothing of the partition is in flight.
    head: Option<(i64, Option<i64>)>,
}

impl PartitionState {
    fn position(&self) -> Option<i64> {
        self.pending.keys().next().copied().or(self.next)
    }

    /// The committed offset, as far as anyone confirmed it: this member's commits or the
    /// group's offset fetched from Kafka.
    fn committed(&self) -> Option<i64> {
        self.committed.max(self.group_committed.flatten())
    }

    /// Where the backlog starts: the committed offset, else where this assignment started
    /// reading, else where `auto_offset_reset` starts. Never below the partition start
    /// (records before it are gone). `None` until known.
    fn lag_from(&self) -> Option<i64> {
        let from = self.committed().or(self.start).or(self.reset_origin)?;
        Some(self.low_watermark.map_or(from, |low| from.max(low)))
    }

    /// High watermark minus [`Self::lag_from`].
    fn lag(&self) -> Option<i64> {
        let hi = self.high_watermark?;
        Some((hi - self.lag_from()?).max(0))
    }

    /// Age of the oldest record not finished: the oldest unfinished record read; with nothing
    /// in flight but lag left, the first unread record (fetched by the lag monitor), else the
    /// last record read (older than any unread one: an upper bound).
    fn lag_seconds(&self, now_ms: i64) -> f64 {
        let oldest = match self.pending.values().next() {
            Some(ts) => *ts,
            None if self.lag().unwrap_or(0) > 0 => match self.head {
                Some((offset, ts)) if Some(offset) == self.lag_from() && ts.is_some() => ts,
                _ => self.last_timestamp,
            },
            None => None,
        };
        oldest.map_or(0.0, |ts| (now_ms - ts).max(0) as f64 / 1000.0)
    }

    /// The offset whose record's timestamp the lag monitor should fetch, if any.
    fn head_wanted(&self) -> Option<i64> {
        if !self.pending.is_empty() || self.lag().unwrap_or(0) == 0 {
            return None;
        }
        let from = self.lag_from()?;
        (self.head.map(|(offset, _)| offset) != Some(from)).then_some(from)
    }
}

/// Where reading starts when the group committed nothing (`kafka.auto_offset_reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    Earliest,
    Latest,
}

impl Reset {
    /// From the config value (`"earliest"` or `"latest"`, validated at load).
    pub fn from_config(value: &str) -> Self {
        if value == "latest" {
            Reset::Latest
        } else {
            Reset::Earliest
        }
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
    /// Last position confirmed committed (by this member or, as fetched, by the group).
    pub committed: Option<i64>,
    /// Records read and not finished.
    pub pending: usize,
    /// Partition end offset, when known.
    pub high_watermark: Option<i64>,
    /// Records not yet finished: high watermark minus committed offset (see the module doc).
    pub lag: Option<i64>,
    /// Age of the oldest record not yet finished, in seconds (0 when none).
    pub lag_seconds: f64,
}

/// Looked up per record (read and finish): foldhash, seeded per process, instead of SipHash.
type Partitions = HashMap<TopicPartition, PartitionState, foldhash::fast::RandomState>;

/// The partitions of one job's records as map keys, each built once: the records of a job
/// share their topic's `Arc`, and cloning it per record would make every worker bump the same
/// reference count. A job spans a few partitions; past [`TpKeys::MAX`] a key is built per record.
#[derive(Default)]
struct TpKeys {
    keys: Vec<TopicPartition>,
    spare: Option<TopicPartition>,
}

impl TpKeys {
    const MAX: usize = 32;

    fn of(&mut self, topic: &Arc<str>, partition: i32) -> &TopicPartition {
        let found = self
            .keys
            .iter()
            .position(|k| k.partition == partition && (Arc::ptr_eq(&k.topic, topic) || k.topic == *topic));
        if let Some(i) = found {
            return &self.keys[i];
        }
        let key = TopicPartition {
            topic: topic.clone(),
            partition,
        };
        if self.keys.len() < Self::MAX {
            self.keys.push(key);
            &self.keys[self.keys.len() - 1]
        } else {
            self.spare.insert(key)
        }
    }
}

/// Shared by the poll thread (reads, commits) and the workers (finish).
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: Mutex<Partitions>,
    generations: AtomicU64,
    /// Threads in `wait_finished` (changed with `partitions` locked), and their wake-up.
    drain_waiters: AtomicUsize,
    drained: Condvar,
}

impl OffsetTracker {
    fn lock(&self) -> MutexGuard<'_, Partitions> {
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
        self.finish_all([(&tp.topic, tp.partition, offset, generation)]) == [true]
    }

    /// [`finish`](Self::finish) for the records of a job (topic, partition, offset,
    /// generation) under one lock: `out[i]` tells whether the `i`th was finished now.
    pub fn finish_all<'t>(&self, records: impl IntoIterator<Item = (&'t Arc<str>, i32, i64, u64)>) -> Vec<bool> {
        let mut keys = TpKeys::default();
        let mut parts = self.lock();
        let mut drained = false;
        let out = records
            .into_iter()
            .map(
                |(topic, partition, offset, generation)| match parts.get_mut(keys.of(topic, partition)) {
                    Some(state) if state.generation == generation => {
                        let removed = state.pending.remove(&offset).is_some();
                        drained |= removed && state.pending.is_empty();
                        removed
                    }
                    _ => false,
                },
            )
            .collect();
        if drained && self.drain_waiters.load(Ordering::Relaxed) > 0 {
            self.drained.notify_all();
        }
        out
    }

    /// [`is_current`](Self::is_current) for the records of a job (topic, partition,
    /// generation) under one lock.
    pub fn current_all<'t>(&self, records: impl IntoIterator<Item = (&'t Arc<str>, i32, u64)>) -> Vec<bool> {
        let mut keys = TpKeys::default();
        let parts = self.lock();
        records
            .into_iter()
            .map(|(topic, partition, generation)| {
                parts
                    .get(keys.of(topic, partition))
                    .is_some_and(|s| s.generation == generation)
            })
            .collect()
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
        self.current_all([(&tp.topic, tp.partition, generation)]) == [true]
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

    /// The tracked partitions with their generations, for the lag monitor's refresh.
    pub fn refresh_targets(&self) -> Vec<(TopicPartition, u64)> {
        let mut out: Vec<_> = self.lock().iter().map(|(tp, s)| (tp.clone(), s.generation)).collect();
        out.sort();
        out
    }

    /// Whether a partition was assigned and its committed offset not fetched yet.
    pub fn needs_refresh(&self) -> bool {
        self.lock().values().any(|s| s.group_committed.is_none())
    }

    /// Applies `f` to the partition's state if it is still the same assignment.
    fn update(&self, tp: &TopicPartition, generation: u64, f: impl FnOnce(&mut PartitionState)) {
        if let Some(state) = self.lock().get_mut(tp).filter(|s| s.generation == generation) {
            f(state);
        }
    }

    /// Records the group's committed offset as fetched from Kafka (`None`: nothing committed).
    pub fn set_group_committed(&self, tp: &TopicPartition, generation: u64, offset: Option<i64>) {
        self.update(tp, generation, |s| s.group_committed = Some(offset));
    }

    /// Records a partition's watermarks; with nothing committed, the first call also fixes
    /// where `reset` starts reading.
    pub fn set_watermarks(&self, tp: &TopicPartition, generation: u64, low: i64, high: i64, reset: Reset) {
        self.update(tp, generation, |s| {
            s.low_watermark = Some(low);
            s.high_watermark = Some(high);
            if s.reset_origin.is_none() && s.group_committed == Some(None) {
                s.reset_origin = Some(match reset {
                    Reset::Earliest => low,
                    Reset::Latest => high,
                });
            }
        });
    }

    /// Partitions whose oldest unfinished record is unread: (partition, generation, offset).
    pub fn heads_wanted(&self) -> Vec<(TopicPartition, u64, i64)> {
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .filter_map(|(tp, s)| Some((tp.clone(), s.generation, s.head_wanted()?)))
            .collect();
        out.sort();
        out
    }

    /// Records the timestamp of the first record at or after `offset` (the monitor read it).
    pub fn set_head(&self, tp: &TopicPartition, generation: u64, offset: i64, timestamp_ms: Option<i64>) {
        self.update(tp, generation, |s| s.head = Some((offset, timestamp_ms)));
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
                committed: s.committed(),
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
    fn a_job_finished_in_one_call_is_finished_record_by_record_as_with_finish() {
        let t = OffsetTracker::default();
        t.assign(&[tp(0), tp(1)]);
        let g0 = (0..3).map(|o| t.read(&tp(0), o, None)).last().unwrap();
        let g1 = (0..3).map(|o| t.read(&tp(1), o, None)).last().unwrap();
        // Another Arc of the same topic name finds the same partitions.
        let other: Arc<str> = "t".into();
        let t0 = tp(0).topic;
        let job = [
            (&t0, 0, 0, g0),
            (&other, 1, 0, g1),
            (&t0, 0, 1, g0),
            (&t0, 0, 1, g0),        // finished a moment ago: not again
            (&other, 1, 2, g1 + 7), // an older or newer generation: ignored
            (&t0, 5, 0, g0),        // not a partition of ours
        ];
        assert_eq!(t.finish_all(job), vec![true, true, true, false, false, false]);
        assert_eq!(t.positions_to_commit(), vec![(tp(0), 2), (tp(1), 1)]);
        assert_eq!(
            t.current_all([(&t0, 0, g0), (&other, 1, g1), (&t0, 1, g0), (&t0, 5, g0)]),
            vec![true, true, false, false]
        );
        t.revoke(&[tp(1)]);
        assert_eq!(t.current_all([(&t0, 0, g0), (&other, 1, g1)]), vec![true, false]);
    }

    #[test]
    fn a_job_over_many_partitions_is_finished_past_the_key_cache() {
        let t = OffsetTracker::default();
        let parts: Vec<TopicPartition> = (0..(TpKeys::MAX as i32 * 2)).map(tp).collect();
        t.assign(&parts);
        let gens: Vec<u64> = parts.iter().map(|p| t.read(p, 0, None)).collect();
        let job: Vec<_> = parts
            .iter()
            .zip(&gens)
            .map(|(p, &g)| (&p.topic, p.partition, 0, g))
            .collect();
        assert_eq!(t.finish_all(job.clone()), vec![true; parts.len()]);
        assert_eq!(t.finish_all(job), vec![false; parts.len()]);
        assert_eq!(t.unfinished(&parts), 0);
    }

    #[test]
    fn a_drain_waiter_is_woken_by_a_job_finished_in_one_call() {
        let t = Arc::new(OffsetTracker::default());
        t.assign(&[tp(0)]);
        let g = t.read(&tp(0), 0, None);
        t.read(&tp(0), 1, None);
        let waiter = {
            let t = t.clone();
            let deadline = Instant::now() + std::time::Duration::from_secs(60);
            std::thread::spawn(move || t.wait_finished(&[tp(0)], || deadline))
        };
        while t.drain_waiters.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let topic = tp(0).topic;
        let finished = Instant::now();
        t.finish_all([(&topic, 0, 0, g), (&topic, 0, 1, g)]);
        assert_eq!(waiter.join().unwrap(), 0, "nothing left");
        assert!(
            finished.elapsed() < std::time::Duration::from_secs(30),
            "woken by the finish, not by its 60 s deadline"
        );
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
        t.set_watermarks(&tp(0), g, 0, 15, Reset::Earliest);
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

    /// Assigns partition 0 and records what the lag monitor fetched; returns the generation.
    fn fetched(t: &OffsetTracker, committed: Option<i64>, low: i64, high: i64, reset: Reset) -> u64 {
        t.assign(&[tp(0)]);
        let (_, g) = t.refresh_targets()[0].clone();
        t.set_group_committed(&tp(0), g, committed);
        t.set_watermarks(&tp(0), g, low, high, reset);
        g
    }

    #[test]
    fn lag_is_unknown_until_the_committed_offset_was_fetched() {
        let t = OffsetTracker::default();
        t.assign(&[tp(0)]);
        assert!(t.needs_refresh());
        let (_, g) = t.refresh_targets()[0].clone();
        t.set_watermarks(&tp(0), g, 0, 100, Reset::Earliest);
        assert_eq!(
            t.snapshot()[0].lag,
            None,
            "not 0: nothing says the partition is caught up"
        );
        t.set_group_committed(&tp(0), g, None);
        assert!(!t.needs_refresh());
    }

    #[test]
    fn an_unread_partition_with_nothing_committed_lags_by_its_whole_backlog_with_earliest() {
        let t = OffsetTracker::default();
        fetched(&t, None, 100, 880, Reset::Earliest);
        let v = &t.snapshot()[0];
        assert_eq!(v.lag, Some(780));
        assert_eq!(v.committed, None);
    }

    #[test]
    fn an_unread_partition_with_nothing_committed_lags_by_what_arrived_since_assignment_with_latest() {
        let t = OffsetTracker::default();
        let g = fetched(&t, None, 0, 500, Reset::Latest);
        assert_eq!(t.snapshot()[0].lag, Some(0));
        t.set_watermarks(&tp(0), g, 0, 530, Reset::Latest);
        assert_eq!(t.snapshot()[0].lag, Some(30), "records produced after the reset point");
    }

    #[test]
    fn an_unread_partition_lags_from_the_groups_committed_offset() {
        let t = OffsetTracker::default();
        fetched(&t, Some(480), 0, 960, Reset::Earliest);
        let v = &t.snapshot()[0];
        assert_eq!(
            v.committed,
            Some(480),
            "the group's offset shows before this member commits"
        );
        assert_eq!(v.lag, Some(480));
        assert!(
            t.positions_to_commit().is_empty(),
            "a fetched offset is not committed again"
        );
    }

    #[test]
    fn own_commits_newer_than_the_last_fetch_count() {
        let t = OffsetTracker::default();
        let g = fetched(&t, Some(480), 0, 960, Reset::Earliest);
        let rg = t.read(&tp(0), 480, None);
        assert_eq!(rg, g);
        t.finish(&tp(0), 480, rg);
        t.committed(&t.positions_to_commit());
        assert_eq!(t.snapshot()[0].committed, Some(481));
        assert_eq!(t.snapshot()[0].lag, Some(479));
    }

    #[test]
    fn a_committed_offset_before_the_partition_start_counts_from_the_start() {
        let t = OffsetTracker::default();
        fetched(&t, Some(10), 400, 1_000, Reset::Earliest);
        assert_eq!(t.snapshot()[0].lag, Some(600), "records before 400 were deleted");
    }

    #[test]
    fn a_late_fetch_for_a_previous_assignment_is_ignored() {
        let t = OffsetTracker::default();
        let old = fetched(&t, Some(5), 0, 10, Reset::Earliest);
        t.revoke(&[tp(0)]);
        t.assign(&[tp(0)]);
        t.set_group_committed(&tp(0), old, Some(1));
        assert!(t.needs_refresh(), "the new assignment still needs its own fetch");
    }

    #[test]
    fn the_age_of_an_unread_backlog_is_the_age_of_its_first_record() {
        let t = OffsetTracker::default();
        let g = fetched(&t, Some(480), 0, 960, Reset::Earliest);
        assert_eq!(t.heads_wanted(), vec![(tp(0), g, 480)]);
        assert_eq!(t.snapshot()[0].lag_seconds, 0.0, "unknown until fetched");
        t.set_head(&tp(0), g, 480, Some(1_000));
        assert!(t.heads_wanted().is_empty());
        assert!(t.snapshot()[0].lag_seconds > 1_000_000.0, "the record is from 1970");
        // Once records are in flight, the oldest of them counts and no fetch is wanted.
        let rg = t.read(&tp(0), 480, Some(2_000));
        assert!(t.heads_wanted().is_empty());
        t.finish(&tp(0), 480, rg);
        t.committed(&t.positions_to_commit());
        assert_eq!(
            t.heads_wanted(),
            vec![(tp(0), g, 481)],
            "the backlog now starts further on"
        );
    }

    #[test]
    fn a_caught_up_partition_has_no_age() {
        let t = OffsetTracker::default();
        fetched(&t, Some(960), 0, 960, Reset::Earliest);
        assert!(t.heads_wanted().is_empty());
        assert_eq!(t.snapshot()[0].lag, Some(0));
        assert_eq!(t.snapshot()[0].lag_seconds, 0.0);
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
