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
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum LaneKey {
    Partition(Arc<str>, i32),
    Key(Arc<str>, i32, Bytes),
    Solo(u64),
}

#[derive(Debug, Default)]
struct Lane {
    queue: VecDeque<Record>,
    busy: bool,
}

/// A finished job, reported back by its task.
struct Done {
    lanes: Vec<LaneKey>,
    records: usize,
    bytes: usize,
}

/// Reports its job's end to the scheduler when dropped: when the job returns, and also when
/// its task unwinds or is cancelled, so a job can never keep its lanes, its worker slot or
/// its in-flight count.
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
    lanes: HashMap<LaneKey, Lane>,
    /// Lanes that are not busy and have queued records (may hold stale keys; checked on pop).
    ready: VecDeque<LaneKey>,
    /// Records in ready lanes, and since when some have been waiting (batch linger).
    ready_records: usize,
    ready_since: Option<Instant>,
    running: usize,
    next_solo: u64,
    tasks: TaskTracker,
}

impl<R: JobRunner> Scheduler<R> {
    pub fn new(settings: Settings, worker: Arc<R>, in_flight: Arc<InFlight>) -> Self {
        Self {
            settings,
            worker,
            in_flight,
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            ready_records: 0,
            ready_since: None,
            running: 0,
            next_solo: 0,
            tasks: TaskTracker::new(),
        }
    }

    /// Runs until the input is closed and every queued record is finished.
    pub async fn run(mut self, mut input: mpsc::Receiver<Input>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut input_open = true;
        loop {
            while self.running < self.settings.workers {
                let Some((job, lanes)) = self.take_job(Instant::now(), !input_open) else {
                    break;
                };
                self.spawn(job, lanes, done_tx.clone());
            }
            if !input_open && self.lanes.is_empty() && self.running == 0 {
                break;
            }
            let linger = self.linger_deadline();
            tokio::select! {
                biased;
                Some(done) = done_rx.recv() => self.on_done(done),
                msg = input.recv(), if input_open => match msg {
                    Some(Input::Record(r)) => self.on_record(r),
                    Some(Input::Revoked(tps)) => self.on_revoked(&tps),
                    Some(Input::End) | None => input_open = false,
                },
                _ = tokio::time::sleep_until(linger.unwrap_or_else(Instant::now)), if linger.is_some() => {}
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn lane_key(&mut self, r: &Record) -> LaneKey {
        match (self.settings.ordering, &r.key) {
            (Ordering::Partition, _) => LaneKey::Partition(r.topic.clone(), r.partition),
            (Ordering::Key, Some(key)) => LaneKey::Key(r.topic.clone(), r.partition, key.clone()),
            (Ordering::Key, None) | (Ordering::Unordered, _) => {
                self.next_solo += 1;
                LaneKey::Solo(self.next_solo)
            }
        }
    }

    fn on_record(&mut self, r: Record) {
        let key = self.lane_key(&r);
        let lane = self.lanes.entry(key.clone()).or_default();
        lane.queue.push_back(r);
        if !lane.busy {
            if lane.queue.len() == 1 {
                self.ready.push_back(key);
            }
            self.mark_ready(1);
        }
    }

    fn mark_ready(&mut self, n: usize) {
        if self.ready_records == 0 && n > 0 {
            self.ready_since = Some(Instant::now());
        }
        self.ready_records += n;
    }

    fn on_done(&mut self, done: Done) {
        self.running -= 1;
        self.in_flight.release(done.records, done.bytes);
        for key in done.lanes {
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            lane.busy = false;
            let queued = lane.queue.len();
            if queued == 0 {
                self.lanes.remove(&key);
            } else {
                self.ready.push_back(key);
                self.mark_ready(queued);
            }
        }
    }

    fn on_revoked(&mut self, tps: &[TopicPartition]) {
        let revoked: HashSet<(&str, i32)> = tps.iter().map(|tp| (&*tp.topic, tp.partition)).collect();
        let (mut records, mut bytes, mut unready) = (0, 0, 0);
        self.lanes.retain(|_, lane| {
            lane.queue.retain(|r| {
                let keep = !revoked.contains(&(&*r.topic, r.partition));
                if !keep {
                    records += 1;
                    bytes += r.size();
                    unready += usize::from(!lane.busy);
                }
                keep
            });
            lane.busy || !lane.queue.is_empty()
        });
        self.in_flight.release(records, bytes);
        self.ready_records -= unready;
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
            DeliveryMode::Batch if self.ready_records > 0 && self.running < self.settings.workers => {
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
                let due = flush
                    || self.ready_records >= b.max_records
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
        while job.len() < max_records && bytes < max_bytes {
            let Some(key) = self.pop_ready() else { break };
            let lane = self.lanes.get_mut(&key).expect("pop_ready returns live lanes");
            // The lane is busy from now on: its remaining records are no longer ready.
            self.ready_records -= lane.queue.len();
            lane.busy = true;
            // Single mode: one record per job. Batch mode: a lane's records in order.
            while job.len() < max_records && (bytes < max_bytes || job.is_empty()) {
                let Some(r) = lane.queue.pop_front() else {
                    break;
                };
                bytes += r.size();
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

    fn spawn(&mut self, job: Vec<Record>, lanes: Vec<LaneKey>, done: mpsc::UnboundedSender<Done>) {
        self.running += 1;
        let worker = self.worker.clone();
        let guard = DoneGuard {
            done: Some(Done {
                lanes,
                records: job.len(),
                bytes: job.iter().map(Record::size).sum(),
            }),
            tx: done,
        };
        self.tasks.spawn(async move {
            let _guard = guard;
            run_job(&*worker, &job).await;
        });
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
    use std::sync::Mutex;

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
    }

    impl JobRunner for Fake {
        async fn run(&self, job: &[Record]) {
            let ids = ids(job);
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
        let settings = Settings {
            ordering: Ordering::Partition,
            mode,
            workers,
            batch: BatchConfig {
                max_records: 10,
                ..BatchConfig::default()
            },
        };
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
                self.tx.send(Input::Record(r)).await.unwrap();
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

    #[test]
    fn a_release_wakes_the_poll_thread_holding_at_the_limit() {
        let in_flight = Arc::new(InFlight::default());
        in_flight.add(100);
        let seen = in_flight.get();
        let releaser = {
            let in_flight = in_flight.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                in_flight.release(1, 100);
            })
        };
        let started = std::time::Instant::now();
        in_flight.wait_for_release(seen, Duration::from_secs(60));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "woken by the release, not by the timeout"
        );
        assert_eq!(in_flight.get(), (0, 0));
        releaser.join().unwrap();
        // Counts that already moved since they were seen: no wait at all.
        let started = std::time::Instant::now();
        in_flight.wait_for_release(seen, Duration::from_secs(60));
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
