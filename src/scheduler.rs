//! Scheduler: turns records into jobs for the worker pool, keeping order where it matters.
//!
//! Records are queued in *lanes*: one per partition (`partition` ordering), one per record
//! key (`key` ordering; records without a key get a lane of their own), or one per record
//! (`unordered`). A lane has at most one job in flight, so a record waiting for a retry
//! blocks only its own lane. At most `workers` jobs run at once.
//!
//! Memory is bounded upstream: the poll thread counts every record it hands over in
//! [`InFlight`] and holds or pauses above the limit; the scheduler releases the count when a
//! job ends (and wakes the poll thread if it holds). Nothing here drops a record except on
//! revoke, where the partition's new owner reads it again from the committed offset.
//!
//! Jobs run on a [`JobRunner`] (the worker in the sidecar, a fake in tests). A job that panics
//! never wedges its lane: a drop guard reports every job's end, so its lanes, its worker slot
//! and its in-flight count are released whatever happens, and the panic is caught and handed
//! to the runner, which decides whether the records are run again (a batch one record at a
//! time, so one bad record cannot take the others down with it) or are over (dead-lettered,
//! or abandoned at shutdown's hard stop and so not committed).

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::BuildHasher;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::{BatchConfig, DeliveryMode, Ordering};
use crate::offsets::TopicPartition;
use crate::pipeline::{panic_message, InFlight, Input, JobRunner};
use crate::record::Record;

/// Wait before running a job again when the runner's panic handling panicked too.
const PANIC_FALLBACK_DELAY: Duration = Duration::from_secs(1);

/// A lane's identity: a 64-bit digest of (topic, partition) or (topic, partition, key) under a
/// per-process seed, or a keyless record's own number. Copied and compared as two words, where
/// the key bytes themselves cost a clone, a hash of the topic and key and a compare per lookup
/// (five lookups per record). Two keys whose digests collide share one lane: their records then
/// run one after another in read order, which keeps every ordering promise and costs only
/// parallelism, for pairs about 2^-64 rare (the seed is unknown outside the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LaneKey {
    Digest(u64),
    Solo(u64),
}

#[derive(Debug, Default)]
struct Lane {
    queue: VecDeque<Record>,
    /// Bytes of the records in `queue` (`Record::size`).
    bytes: usize,
    busy: bool,
}

/// A finished job, reported back by its worker slot.
struct Done {
    lanes: Vec<LaneKey>,
    records: usize,
    bytes: usize,
    /// The slot that ran it, idle again.
    slot: usize,
}

/// A job on its way to a worker slot, with the guard that reports its end.
struct Job {
    records: Vec<Record>,
    _guard: DoneGuard,
}

/// Reports its job's end to the scheduler when dropped: when the job returns, and also when
/// its task unwinds or is cancelled or the job is dropped unrun, so a job can never keep its
/// lanes, its worker slot or its in-flight count.
struct DoneGuard {
    done: Option<Done>,
    tx: mpsc::UnboundedSender<Done>,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = self.tx.send(done);
        }
    }
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ordering: Ordering,
    pub mode: DeliveryMode,
    pub workers: usize,
    pub batch: BatchConfig,
}

pub struct Scheduler<R> {
    settings: Settings,
    worker: Arc<R>,
    in_flight: Arc<InFlight>,
    /// Lanes by key (foldhash: a fraction of SipHash's cost for a key looked up several
    /// times per record).
    lanes: HashMap<LaneKey, Lane, foldhash::fast::RandomState>,
    /// Seeded per process (like std's RandomState): makes the lane digests of record keys.
    digest: foldhash::quality::RandomState,
    /// Lanes that are not busy and have queued records (may hold stale keys; checked on pop).
    ready: VecDeque<LaneKey>,
    /// Records (and their bytes) in ready lanes, and since when some have been waiting
    /// (batch linger).
    ready_records: usize,
    ready_bytes: usize,
    ready_since: Option<Instant>,
    next_solo: u64,
    /// Worker slots: one long-lived task each, started as needed up to `workers`, taking one
    /// job at a time from its channel (a task spawned per job cost ~8 % of single mode's
    /// CPU: the job future's allocation, moves and task-list bookkeeping). `idle` holds the
    /// indices of the slots without a job.
    slots: Vec<mpsc::Sender<Job>>,
    idle: Vec<usize>,
    tasks: TaskTracker,
}

impl<R: JobRunner> Scheduler<R> {
    pub fn new(settings: Settings, worker: Arc<R>, in_flight: Arc<InFlight>) -> Self {
        Self {
            settings,
            worker,
            in_flight,
            lanes: HashMap::default(),
            digest: foldhash::quality::RandomState::default(),
            ready: VecDeque::new(),
            ready_records: 0,
            ready_bytes: 0,
            ready_since: None,
            next_solo: 0,
            slots: Vec::new(),
            idle: Vec::new(),
            tasks: TaskTracker::new(),
        }
    }

    /// Runs until the input is closed and every queued record is finished.
    pub async fn run(mut self, mut input: mpsc::Receiver<Input>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut input_open = true;
        loop {
            while self.running() < self.settings.workers {
                let Some((job, lanes)) = self.take_job(Instant::now(), !input_open) else {
                    break;
                };
                self.spawn(job, lanes, done_tx.clone());
            }
            if !input_open && self.lanes.is_empty() && self.running() == 0 {
                break;
            }
            let linger = self.linger_deadline();
            tokio::select! {
                biased;
                Some(done) = done_rx.recv() => self.on_done(done),
                msg = input.recv(), if input_open => match msg {
                    Some(Input::Records(run)) => run.into_iter().for_each(|r| self.on_record(r)),
                    Some(Input::Revoked(tps)) => self.on_revoked(&tps),
                    Some(Input::End) | None => input_open = false,
                },
                _ = tokio::time::sleep_until(linger.unwrap_or_else(Instant::now)), if linger.is_some() => {}
            }
        }
        // Every slot is idle: closing their channels ends their tasks.
        self.slots.clear();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn lane_key(&mut self, r: &Record) -> LaneKey {
        match (self.settings.ordering, &r.key) {
            (Ordering::Partition, _) => LaneKey::Digest(self.digest.hash_one((&*r.topic, r.partition))),
            (Ordering::Key, Some(key)) => LaneKey::Digest(self.digest.hash_one((&*r.topic, r.partition, &key[..]))),
            (Ordering::Key, None) | (Ordering::Unordered, _) => {
                self.next_solo += 1;
                LaneKey::Solo(self.next_solo)
            }
        }
    }

    fn on_record(&mut self, r: Record) {
        let key = self.lane_key(&r);
        let lane = self.lanes.entry(key).or_default();
        let size = r.size();
        lane.queue.push_back(r);
        lane.bytes += size;
        if !lane.busy {
            if lane.queue.len() == 1 {
                self.ready.push_back(key);
            }
            self.mark_ready(1, size);
        }
    }

    fn mark_ready(&mut self, n: usize, bytes: usize) {
        if self.ready_records == 0 && n > 0 {
            self.ready_since = Some(Instant::now());
        }
        self.ready_records += n;
        self.ready_bytes += bytes;
    }

    fn on_done(&mut self, done: Done) {
        self.idle.push(done.slot);
        self.in_flight.release(done.records, done.bytes);
        for key in done.lanes {
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            lane.busy = false;
            let (queued, bytes) = (lane.queue.len(), lane.bytes);
            if queued == 0 {
                self.lanes.remove(&key);
            } else {
                self.ready.push_back(key);
                self.mark_ready(queued, bytes);
            }
        }
    }

    fn on_revoked(&mut self, tps: &[TopicPartition]) {
        let revoked: HashSet<(&str, i32)> = tps.iter().map(|tp| (&*tp.topic, tp.partition)).collect();
        let (mut records, mut bytes, mut unready, mut unready_bytes) = (0, 0, 0, 0);
        self.lanes.retain(|_, lane| {
            let busy = lane.busy;
            let mut lane_bytes = 0;
            lane.queue.retain(|r| {
                let keep = !revoked.contains(&(&*r.topic, r.partition));
                if !keep {
                    let size = r.size();
                    records += 1;
                    bytes += size;
                    lane_bytes += size;
                    if !busy {
                        unready += 1;
                        unready_bytes += size;
                    }
                }
                keep
            });
            lane.bytes -= lane_bytes;
            lane.busy || !lane.queue.is_empty()
        });
        self.in_flight.release(records, bytes);
        self.ready_records -= unready;
        self.ready_bytes -= unready_bytes;
        if records > 0 {
            tracing::info!(
                records,
                "dropped queued records of revoked partitions (their new owner reads them again)"
            );
        }
    }

    /// Next ready lane, skipping stale entries.
    fn pop_ready(&mut self) -> Option<LaneKey> {
        while let Some(key) = self.ready.pop_front() {
            if self.lanes.get(&key).is_some_and(|l| !l.busy && !l.queue.is_empty()) {
                return Some(key);
            }
        }
        None
    }

    /// In batch mode, when the next batch is due even if not full.
    fn linger_deadline(&self) -> Option<Instant> {
        match self.settings.mode {
            DeliveryMode::Batch if self.ready_records > 0 && self.running() < self.settings.workers => {
                self.ready_since.map(|t| t + self.settings.batch.linger)
            }
            _ => None,
        }
    }

    fn take_job(&mut self, now: Instant, flush: bool) -> Option<(Vec<Record>, Vec<LaneKey>)> {
        if self.ready_records == 0 {
            return None;
        }
        let (max_records, max_bytes) = match self.settings.mode {
            DeliveryMode::Single => (1, usize::MAX),
            DeliveryMode::Batch => {
                let b = &self.settings.batch;
                // Full (by records or by bytes): at once. Partial: after the linger.
                let due = flush
                    || self.ready_records >= b.max_records
                    || self.ready_bytes >= b.max_bytes.as_u64() as usize
                    || self.ready_since.is_some_and(|t| now >= t + b.linger);
                if !due {
                    return None;
                }
                (b.max_records, b.max_bytes.as_u64() as usize)
            }
        };
        let mut job = Vec::new();
        let mut lanes = Vec::new();
        let mut bytes = 0;
        // At least one record, even over `max_bytes` (or with `max_bytes = 0`): never an empty job.
        while job.len() < max_records && (bytes < max_bytes || job.is_empty()) {
            let Some(key) = self.pop_ready() else { break };
            // pop_ready returns live lanes only; a missing one would just be skipped.
            let Some(lane) = self.lanes.get_mut(&key) else { continue };
            // The lane is busy from now on: its remaining records are no longer ready.
            self.ready_records -= lane.queue.len();
            self.ready_bytes -= lane.bytes;
            lane.busy = true;
            // Single mode: one record per job. Batch mode: a lane's records in order.
            while job.len() < max_records && (bytes < max_bytes || job.is_empty()) {
                let Some(r) = lane.queue.pop_front() else {
                    break;
                };
                let size = r.size();
                bytes += size;
                lane.bytes -= size;
                job.push(r);
                if self.settings.mode == DeliveryMode::Single {
                    break;
                }
            }
            lanes.push(key);
        }
        self.ready_since = (self.ready_records > 0).then_some(now);
        (!job.is_empty()).then_some((job, lanes))
    }

    /// Jobs running now: every worker slot that is not idle.
    fn running(&self) -> usize {
        self.slots.len() - self.idle.len()
    }

    /// Hands a job to an idle worker slot (a new one while there are fewer than `workers`).
    fn spawn(&mut self, job: Vec<Record>, lanes: Vec<LaneKey>, done: mpsc::UnboundedSender<Done>) {
        let idle = self.idle.pop();
        let slot = idle.unwrap_or(self.slots.len());
        let guard = DoneGuard {
            done: Some(Done {
                lanes,
                records: job.len(),
                bytes: job.iter().map(Record::size).sum(),
                slot,
            }),
            tx: done,
        };
        let job = Job {
            records: job,
            _guard: guard,
        };
        if idle.is_none() {
            let tx = self.slot_task(job);
            self.slots.push(tx);
            return;
        }
        // An idle slot's channel (capacity 1) is empty, and closed only if the slot's task
        // ended, which it does not while the scheduler runs (a panic is caught in run_job);
        // should it have, the slot gets a fresh task that starts with this job.
        if let Err(mpsc::error::TrySendError::Closed(job) | mpsc::error::TrySendError::Full(job)) =
            self.slots[slot].try_send(job)
        {
            self.slots[slot] = self.slot_task(job);
        }
    }

    /// Starts a worker slot's task with its first job: it runs the jobs it is given, one at a
    /// time, until its channel closes. Each job's guard is dropped (its end reported, the slot
    /// idle again) before the next one is awaited.
    fn slot_task(&self, first: Job) -> mpsc::Sender<Job> {
        let (tx, mut rx) = mpsc::channel::<Job>(1);
        let worker = self.worker.clone();
        self.tasks.spawn(async move {
            let mut next = Some(first);
            while let Some(job) = next.take() {
                run_job(&*worker, &job.records).await;
                drop(job);
                next = rx.recv().await;
            }
        });
        tx
    }
}

/// Runs a job, and runs it again after a panic for as long as the runner says so. A job of
/// several records that panicked is run again one record at a time, in order.
async fn run_job<R: JobRunner>(runner: &R, job: &[Record]) {
    let Err(message) = caught(runner.run(job)).await else {
        return;
    };
    if job.len() == 1 {
        return rerun_after_panic(runner, job, message).await;
    }
    if !after_panic(runner, job, 1, &message).await {
        return;
    }
    for one in job.chunks(1) {
        if let Err(message) = caught(runner.run(one)).await {
            rerun_after_panic(runner, one, message).await;
        }
    }
}

async fn rerun_after_panic<R: JobRunner>(runner: &R, job: &[Record], mut message: String) {
    for panics in 1.. {
        if !after_panic(runner, job, panics, &message).await {
            return;
        }
        match caught(runner.run(job)).await {
            Ok(()) => return,
            Err(m) => message = m,
        }
    }
}

/// The runner's decision after a panic; if deciding panics too, wait and run the job again.
async fn after_panic<R: JobRunner>(runner: &R, job: &[Record], panics: u32, message: &str) -> bool {
    match caught(runner.after_panic(job, panics, message)).await {
        Ok(again) => again,
        Err(second) => {
            tracing::error!(
                topic = %job[0].topic, partition = job[0].partition, offset = job[0].offset,
                records = job.len(), panic = %message, while_handling = %second,
                "handling a panicked delivery job panicked too; running the job again"
            );
            tokio::time::sleep(PANIC_FALLBACK_DELAY).await;
            true
        }
    }
}

/// Polls a future, turning a panic into its message.
async fn caught<T>(fut: impl Future<Output = T>) -> Result<T, String> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|panic| panic_message(&*panic))
}

#[cfg(test)]
mod tests {
    //! The scheduler driven by a fake runner on tokio's paused clock: a wedge shows up as the
    //! (virtual) hour-long timeout firing at once, not as a hanging test.
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;

    type Id = (i32, i64);

    fn ids(job: &[Record]) -> Vec<Id> {
        job.iter().map(|r| (r.partition, r.offset)).collect()
    }

    fn record(partition: i32, offset: i64) -> Record {
        Record {
            topic: "t".into(),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            value: Some(Bytes::from_static(b"value")),
            headers: Vec::new(),
            generation: 1,
        }
    }

    /// A runner that records what it runs, takes `slow` for some records and panics on others.
    #[derive(Default)]
    struct Fake {
        /// Jobs as they started and ended, with the (virtual) time.
        started: Mutex<Vec<(Vec<Id>, Instant)>>,
        ended: Mutex<Vec<(Vec<Id>, Instant)>>,
        /// A job holding one of these records panics (after its delay).
        panic_on: HashSet<Id>,
        /// How long a job holding one of these records takes.
        slow: HashMap<Id, Duration>,
        /// Calls of `after_panic`: the job and its panic count.
        panics: Mutex<Vec<(Vec<Id>, u32)>>,
        /// Records given up on (dead-lettered, in the worker) after `max_panics`.
        given_up: Mutex<Vec<Id>>,
        max_panics: u32,
        /// Jobs running now, and the most ever running at once.
        active: AtomicUsize,
        peak: AtomicUsize,
    }

    /// Counts a running job in `Fake::active` until dropped (also when the job panics).
    struct Active<'a>(&'a AtomicUsize);

    impl<'a> Active<'a> {
        fn new(active: &'a AtomicUsize, peak: &AtomicUsize) -> Self {
            let now = active.fetch_add(1, AtomicOrdering::SeqCst) + 1;
            peak.fetch_max(now, AtomicOrdering::SeqCst);
            Self(active)
        }
    }

    impl Drop for Active<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, AtomicOrdering::SeqCst);
        }
    }

    impl JobRunner for Fake {
        async fn run(&self, job: &[Record]) {
            let ids = ids(job);
            let _active = Active::new(&self.active, &self.peak);
            self.started.lock().unwrap().push((ids.clone(), Instant::now()));
            if let Some(delay) = ids.iter().filter_map(|id| self.slow.get(id)).max() {
                tokio::time::sleep(*delay).await;
            }
            if ids.iter().any(|id| self.panic_on.contains(id)) {
                panic!("fake runner panics on {ids:?}");
            }
            self.ended.lock().unwrap().push((ids, Instant::now()));
        }

        async fn after_panic(&self, job: &[Record], panics: u32, _message: &str) -> bool {
            self.panics.lock().unwrap().push((ids(job), panics));
            if job.len() == 1 && panics >= self.max_panics {
                self.given_up.lock().unwrap().push((job[0].partition, job[0].offset));
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            true
        }
    }

    impl Fake {
        fn started(&self) -> Vec<Vec<Id>> {
            self.started
                .lock()
                .unwrap()
                .iter()
                .map(|(ids, _)| ids.clone())
                .collect()
        }
    }

    struct Running {
        tx: mpsc::Sender<Input>,
        in_flight: Arc<InFlight>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(fake: &Arc<Fake>, mode: DeliveryMode, workers: usize) -> Running {
        start_with(fake, settings(Ordering::Partition, mode, workers))
    }

    /// Settings with batches of at most 10 records (1 MiB, 20ms linger).
    fn settings(ordering: Ordering, mode: DeliveryMode, workers: usize) -> Settings {
        Settings {
            ordering,
            mode,
            workers,
            batch: BatchConfig {
                max_records: 10,
                ..BatchConfig::default()
            },
        }
    }

    fn start_with(fake: &Arc<Fake>, settings: Settings) -> Running {
        let in_flight = Arc::new(InFlight::default());
        let (tx, rx) = mpsc::channel(1000);
        let scheduler = Scheduler::new(settings, fake.clone(), in_flight.clone());
        Running {
            tx,
            in_flight,
            task: tokio::spawn(scheduler.run(rx)),
        }
    }

    impl Running {
        /// Hands records over the way the poll thread does: counted in flight, then sent.
        async fn send(&self, records: impl IntoIterator<Item = Record>) {
            for r in records {
                self.in_flight.add(r.size());
                self.tx.send(Input::Records(vec![r])).await.unwrap();
            }
        }

        /// Ends the input and waits for the scheduler to finish everything.
        async fn finish(self) -> Arc<InFlight> {
            self.tx.send(Input::End).await.unwrap();
            tokio::time::timeout(Duration::from_secs(3600), self.task)
                .await
                .expect("the scheduler finished (nothing wedged)")
                .expect("the scheduler did not panic");
            self.in_flight
        }
    }

    #[tokio::test(start_paused = true)]
    async fn worker_slots_are_reused_and_a_slot_whose_task_ended_gets_a_fresh_one_with_the_job() {
        let fake = Arc::new(Fake::default());
        let mut sched = Scheduler::new(
            settings(Ordering::Unordered, DeliveryMode::Single, 2),
            fake.clone(),
            Arc::new(InFlight::default()),
        );
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        for offset in 0..5 {
            sched.spawn(vec![record(0, offset)], Vec::new(), done_tx.clone());
            let done = done_rx.recv().await.expect("the job's end is reported");
            sched.on_done(done);
        }
        assert_eq!(sched.slots.len(), 1, "one job at a time needs one slot");
        // The slot's task is gone (its channel closed): the next job still runs.
        let (closed, _) = mpsc::channel::<Job>(1);
        sched.slots[0] = closed;
        sched.spawn(vec![record(0, 5)], Vec::new(), done_tx.clone());
        let done = tokio::time::timeout(Duration::from_secs(3600), done_rx.recv())
            .await
            .expect("the job ran on a fresh task")
            .expect("its end is reported");
        assert_eq!((done.slot, done.records), (0, 1));
        sched.on_done(done);
        assert_eq!(sched.slots.len(), 1);
        let ended: Vec<Vec<Id>> = fake.ended.lock().unwrap().iter().map(|(ids, _)| ids.clone()).collect();
        assert_eq!(ended, (0..6).map(|o| vec![(0, o)]).collect::<Vec<_>>());
        assert_eq!(sched.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_job_releases_its_lane_slot_and_in_flight_count_and_the_next_record_runs() {
        let fake = Arc::new(Fake {
            panic_on: HashSet::from([(0, 1)]),
            max_panics: 3,
            ..Fake::default()
        });
        // One worker: a leaked slot would stop everything after the panic.
        let s = start(&fake, DeliveryMode::Single, 1);
        s.send([record(0, 0), record(0, 1), record(0, 2), record(1, 0)]).await;
        let in_flight = s.finish().await;

        let started = fake.started();
        let lane0: Vec<_> = started.iter().flatten().filter(|(p, _)| *p == 0).collect();
        assert_eq!(
            lane0,
            [&(0, 0), &(0, 1), &(0, 1), &(0, 1), &(0, 2)],
            "run again after each panic, then the lane goes on in order"
        );
        assert!(started.contains(&vec![(1, 0)]), "the other lane ran: {started:?}");
        assert_eq!(
            *fake.panics.lock().unwrap(),
            [(vec![(0, 1)], 1), (vec![(0, 1)], 2), (vec![(0, 1)], 3)]
        );
        assert_eq!(*fake.given_up.lock().unwrap(), [(0, 1)]);
        assert_eq!(in_flight.get(), (0, 0), "every record's in-flight count was released");
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_batch_is_run_again_one_record_at_a_time_in_order() {
        let fake = Arc::new(Fake {
            panic_on: HashSet::from([(0, 2)]),
            max_panics: 2,
            ..Fake::default()
        });
        let s = start(&fake, DeliveryMode::Batch, 2);
        s.send((0..5).map(|o| record(0, o))).await;
        let in_flight = s.finish().await;

        let batch: Vec<Id> = (0..5).map(|o| (0, o)).collect();
        let one = |o| vec![(0, o)];
        assert_eq!(
            fake.started(),
            [batch.clone(), one(0), one(1), one(2), one(2), one(3), one(4)],
            "the batch panicked; its records ran alone, the bad one until given up"
        );
        assert_eq!(*fake.panics.lock().unwrap(), [(batch, 1), (one(2), 1), (one(2), 2)]);
        assert_eq!(*fake.given_up.lock().unwrap(), [(0, 2)]);
        assert_eq!(in_flight.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn end_of_input_finishes_once_every_queued_record_ran_in_lane_order() {
        let slow = (0..3)
            .flat_map(|p| (0..5).map(move |o| ((p, o), Duration::from_millis(10 * (5 - o) as u64))))
            .collect();
        let fake = Arc::new(Fake {
            slow,
            ..Fake::default()
        });
        let s = start(&fake, DeliveryMode::Single, 2);
        s.send((0..5).flat_map(|o| (0..3).map(move |p| record(p, o)))).await;
        let in_flight = s.finish().await;

        let ended = fake.ended.lock().unwrap().clone();
        assert_eq!(
            ended.len(),
            15,
            "every record ran to its end before the scheduler finished"
        );
        for p in 0..3 {
            let order: Vec<i64> = ended
                .iter()
                .flat_map(|(ids, _)| ids)
                .filter(|(q, _)| *q == p)
                .map(|(_, o)| *o)
                .collect();
            assert_eq!(order, [0, 1, 2, 3, 4], "partition {p} in offset order");
        }
        assert_eq!(in_flight.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoke_while_a_lanes_job_is_in_flight_drops_its_queue_and_the_lane_waits_for_the_job() {
        let fake = Arc::new(Fake {
            slow: HashMap::from([((0, 0), Duration::from_secs(10))]),
            ..Fake::default()
        });
        let s = start(&fake, DeliveryMode::Single, 4);
        s.send([record(0, 0), record(0, 1), record(0, 2), record(1, 0)]).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(fake.started(), [vec![(0, 0)], vec![(1, 0)]], "0/0 is in flight");

        s.tx.send(Input::Revoked(vec![TopicPartition::new("t", 0)]))
            .await
            .unwrap();
        // The partition comes back (a new generation) while its old job is still running.
        let mut again = record(0, 1);
        again.generation = 2;
        s.send([again]).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            s.in_flight.get(),
            (2, 2 * record(0, 0).size()),
            "queued 0/1 and 0/2 were released; 0/0 and the new 0/1 are held"
        );
        assert_eq!(fake.started().len(), 2, "the new 0/1 waits for its lane");

        let in_flight = s.finish().await;
        let started = fake.started.lock().unwrap().clone();
        let ended = fake.ended.lock().unwrap().clone();
        assert_eq!(started.len(), 3, "revoked records never ran: {started:?}");
        let old_end = ended.iter().find(|(ids, _)| ids == &[(0, 0)]).unwrap().1;
        let new_start = started.iter().find(|(ids, _)| ids == &[(0, 1)]).unwrap().1;
        assert!(new_start >= old_end, "the lane stays ordered across the revoke");
        assert_eq!(in_flight.get(), (0, 0));
    }

    fn keyed(partition: i32, offset: i64, key: Option<&'static str>) -> Record {
        Record {
            key: key.map(|k| Bytes::from_static(k.as_bytes())),
            ..record(partition, offset)
        }
    }

    fn sized(partition: i32, offset: i64, value_len: usize) -> Record {
        Record {
            value: Some(Bytes::from(vec![b'v'; value_len])),
            ..record(partition, offset)
        }
    }

    fn slow(ids: impl IntoIterator<Item = (Id, u64)>) -> HashMap<Id, Duration> {
        ids.into_iter()
            .map(|(id, ms)| (id, Duration::from_millis(ms)))
            .collect()
    }

    impl Fake {
        /// When the first job holding `id` started / ended.
        fn start_of(&self, id: Id) -> Instant {
            find(&self.started, id)
        }

        fn end_of(&self, id: Id) -> Instant {
            find(&self.ended, id)
        }

        /// Sizes of the jobs started so far.
        fn job_sizes(&self) -> Vec<usize> {
            self.started().iter().map(Vec::len).collect()
        }
    }

    fn find(log: &Mutex<Vec<(Vec<Id>, Instant)>>, id: Id) -> Instant {
        let log = log.lock().unwrap();
        log.iter()
            .find(|(ids, _)| ids.contains(&id))
            .unwrap_or_else(|| panic!("{id:?} not in {log:?}"))
            .1
    }

    #[tokio::test(start_paused = true)]
    async fn key_lanes_keep_a_keys_records_in_order_and_run_other_keys_and_keyless_records_in_parallel() {
        let fake = Arc::new(Fake {
            slow: slow([
                ((0, 0), 10_000),
                ((0, 1), 10_000),
                ((0, 2), 1_000),
                ((0, 3), 10_000),
                ((0, 4), 1_000),
            ]),
            ..Fake::default()
        });
        let t0 = Instant::now();
        let s = start_with(&fake, settings(Ordering::Key, DeliveryMode::Single, 8));
        s.send([
            keyed(0, 0, Some("a")),
            keyed(0, 1, Some("b")),
            keyed(0, 2, Some("a")),
            keyed(0, 3, None),
            keyed(0, 4, None),
            keyed(1, 0, Some("a")),
        ])
        .await;
        let in_flight = s.finish().await;

        for id in [(0, 0), (0, 1), (0, 3), (0, 4), (1, 0)] {
            assert_eq!(fake.start_of(id), t0, "{id:?} started at once: its own lane");
        }
        assert_eq!(
            fake.start_of((0, 2)),
            fake.end_of((0, 0)),
            "key a of partition 0 waits for the record before it, and no longer"
        );
        assert!(
            fake.end_of((0, 4)) < fake.end_of((0, 3)),
            "records without a key are not ordered"
        );
        assert_eq!(in_flight.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn partition_lanes_run_a_partitions_records_in_order_and_partitions_in_parallel() {
        let fake = Arc::new(Fake {
            slow: slow([
                ((0, 0), 10_000),
                ((0, 1), 1_000),
                ((0, 2), 1_000),
                ((1, 0), 5_000),
                ((1, 1), 1_000),
            ]),
            ..Fake::default()
        });
        let t0 = Instant::now();
        let s = start_with(&fake, settings(Ordering::Partition, DeliveryMode::Single, 4));
        // Different keys: partition ordering ignores them.
        s.send([
            keyed(0, 0, Some("a")),
            keyed(0, 1, Some("b")),
            keyed(1, 0, Some("a")),
            keyed(0, 2, None),
            keyed(1, 1, Some("c")),
        ])
        .await;
        let in_flight = s.finish().await;

        assert_eq!(fake.start_of((0, 0)), t0);
        assert_eq!(fake.start_of((1, 0)), t0, "partitions run in parallel");
        assert_eq!(fake.start_of((0, 1)), fake.end_of((0, 0)));
        assert_eq!(fake.start_of((0, 2)), fake.end_of((0, 1)));
        assert_eq!(fake.start_of((1, 1)), fake.end_of((1, 0)));
        assert_eq!(fake.end_of((0, 2)) - t0, Duration::from_secs(12));
        assert_eq!(
            fake.peak.load(AtomicOrdering::SeqCst),
            2,
            "one job per partition at a time"
        );
        assert_eq!(in_flight.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_workers_jobs_run_at_once() {
        let fake = Arc::new(Fake {
            slow: slow((0..10).map(|o| ((0, o), 1_000))),
            ..Fake::default()
        });
        let t0 = Instant::now();
        let s = start_with(&fake, settings(Ordering::Unordered, DeliveryMode::Single, 3));
        s.send((0..10).map(|o| record(0, o))).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(fake.started().len(), 3, "three workers busy, seven records wait");
        let in_flight = s.finish().await;

        assert_eq!(fake.peak.load(AtomicOrdering::SeqCst), 3);
        assert_eq!(fake.ended.lock().unwrap().len(), 10);
        assert_eq!(
            Instant::now() - t0,
            Duration::from_secs(4),
            "a freed worker takes the next record at once: 4 rounds of 3"
        );
        assert_eq!(in_flight.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_records_and_bytes_are_released_exactly_when_each_job_ends() {
        let fake = Arc::new(Fake {
            slow: slow([((0, 0), 10_000), ((0, 1), 10_000), ((1, 0), 30_000)]),
            ..Fake::default()
        });
        let s = start(&fake, DeliveryMode::Single, 4);
        let (a, b, c) = (sized(0, 0, 100), sized(0, 1, 200), sized(1, 0, 300));
        let (a_size, b_size, c_size) = (a.size(), b.size(), c.size());
        s.send([a, b, c]).await;

        let expected = [
            (5, (3, a_size + b_size + c_size), "all three held (0/1 queued)"),
            (15, (2, b_size + c_size), "0/0 ended at 10s"),
            (25, (1, c_size), "0/1 ended at 20s"),
            (35, (0, 0), "1/0 ended at 30s"),
        ];
        let t0 = Instant::now();
        for (at, counts, why) in expected {
            tokio::time::sleep_until(t0 + Duration::from_secs(at)).await;
            assert_eq!(s.in_flight.get(), counts, "at {at}s: {why}");
        }
        s.finish().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once_and_a_partial_one_after_the_linger_not_before() {
        let fake = Arc::new(Fake::default());
        let t0 = Instant::now();
        let s = start_with(&fake, settings(Ordering::Unordered, DeliveryMode::Batch, 4));
        s.send((0..15).map(|o| record(0, o))).await;
        let linger = BatchConfig::default().linger;

        tokio::time::sleep(linger - Duration::from_millis(1)).await;
        assert_eq!(fake.job_sizes(), [10], "the full batch of 10 went at once");
        assert_eq!(fake.start_of((0, 0)), t0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(fake.job_sizes(), [10, 5], "the partial batch went after the linger");
        assert_eq!(fake.start_of((0, 14)), t0 + linger);
        assert_eq!(s.finish().await.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_full_by_bytes_goes_at_once_and_holds_at_most_max_bytes() {
        let fake = Arc::new(Fake::default());
        let size = record(0, 0).size();
        let mut settings = settings(Ordering::Unordered, DeliveryMode::Batch, 4);
        settings.batch.max_bytes = bytesize::ByteSize::b(3 * size as u64);
        let t0 = Instant::now();
        let s = start_with(&fake, settings);
        s.send((0..7).map(|o| record(0, o))).await;

        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fake.job_sizes(), [3, 3], "two batches full by bytes went at once");
        assert_eq!(fake.start_of((0, 3)), t0);
        let in_flight = s.finish().await;
        assert_eq!(fake.job_sizes(), [3, 3, 1], "the rest went at the end of input");
        assert_eq!(in_flight.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_over_max_bytes_goes_alone_even_with_max_bytes_zero() {
        let fake = Arc::new(Fake::default());
        let mut settings = settings(Ordering::Unordered, DeliveryMode::Batch, 4);
        settings.batch.max_bytes = bytesize::ByteSize::b(0);
        let s = start_with(&fake, settings);
        s.send((0..3).map(|o| record(0, o))).await;
        let in_flight = s.finish().await;
        assert_eq!(fake.job_sizes(), [1, 1, 1], "never an empty batch, never a wedge");
        assert_eq!(in_flight.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoke_drops_the_revoked_records_of_a_lingering_batch() {
        let fake = Arc::new(Fake::default());
        let t0 = Instant::now();
        let s = start(&fake, DeliveryMode::Batch, 4);
        s.send([record(0, 0), record(0, 1), record(1, 0)]).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.tx.send(Input::Revoked(vec![TopicPartition::new("t", 0)]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.in_flight.get(), (1, record(1, 0).size()), "released on revoke");
        assert!(fake.started().is_empty(), "still lingering");

        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(fake.started(), [vec![(1, 0)]], "only the kept record went");
        assert_eq!(fake.start_of((1, 0)), t0 + BatchConfig::default().linger);
        assert_eq!(s.finish().await.get(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_input_sends_a_partial_batch_without_waiting_for_the_linger() {
        let fake = Arc::new(Fake::default());
        let t0 = Instant::now();
        let s = start(&fake, DeliveryMode::Batch, 4);
        s.send([record(0, 0), record(0, 1), record(1, 0)]).await;
        let in_flight = s.finish().await;
        assert_eq!(fake.job_sizes(), [3]);
        assert_eq!(fake.start_of((1, 0)), t0, "flushed at once");
        assert_eq!(in_flight.get(), (0, 0));
    }

    #[test]
    fn the_poll_thread_holding_at_the_limit_is_woken_once_the_counts_are_down_to_its_target() {
        let in_flight = Arc::new(InFlight::default());
        for _ in 0..10 {
            in_flight.add(100);
        }
        let releaser = {
            let in_flight = in_flight.clone();
            std::thread::spawn(move || {
                for _ in 0..10 {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    in_flight.release(1, 100);
                }
            })
        };
        let started = std::time::Instant::now();
        in_flight.wait_for_release((4, usize::MAX), Duration::from_secs(60));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "woken by the release, not by the timeout"
        );
        let (records, _) = in_flight.get();
        assert!(records <= 4, "woken before the target: {records} records in flight");
        releaser.join().unwrap();
        assert_eq!(in_flight.get(), (0, 0));
        // The bytes are a target too.
        in_flight.add(1000);
        let releaser = {
            let in_flight = in_flight.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                in_flight.release(0, 600);
            })
        };
        in_flight.wait_for_release((usize::MAX, 400), Duration::from_secs(60));
        assert_eq!(in_flight.get(), (1, 400));
        releaser.join().unwrap();
        // Counts already at the target: no wait at all.
        let started = std::time::Instant::now();
        in_flight.wait_for_release((1, 400), Duration::from_secs(60));
        assert!(started.elapsed() < Duration::from_secs(30));
        // Never reached: back after the timeout.
        let started = std::time::Instant::now();
        in_flight.wait_for_release((0, 0), Duration::from_millis(50));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }
}
