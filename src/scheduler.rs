//! Scheduler: turns records into jobs for the worker pool, keeping order where it matters.
//!
//! Records are queued in *lanes*: one per partition (`partition` ordering), one per record
//! key (`key` ordering; records without a key get a lane of their own), or one per record
//! (`unordered`). A lane has at most one job in flight, so a record waiting for a retry
//! blocks only its own lane. At most `workers` jobs run at once.
//!
//! Memory is bounded upstream: the poll thread counts every record it hands over in
//! [`InFlight`] and pauses partitions above the limit; the scheduler releases the count
//! when a job ends. Nothing here drops a record except on revoke, where the partition's
//! new owner reads it again from the committed offset.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::{BatchConfig, DeliveryMode, Ordering};
use crate::offsets::TopicPartition;
use crate::record::Record;
use crate::worker::Worker;

/// What the poll thread sends to the scheduler.
#[derive(Debug)]
pub enum Input {
    Record(Record),
    /// These partitions were revoked: drop their queued records.
    Revoked(Vec<TopicPartition>),
    /// Shutdown: nothing more will be read; finish what is queued, then stop.
    End,
}

/// Records and bytes read and not yet finished: the memory bound.
#[derive(Debug, Default)]
pub struct InFlight {
    pub records: AtomicUsize,
    pub bytes: AtomicUsize,
}

impl InFlight {
    pub fn add(&self, bytes: usize) {
        self.records.fetch_add(1, AtomicOrdering::Relaxed);
        self.bytes.fetch_add(bytes, AtomicOrdering::Relaxed);
    }

    fn release(&self, records: usize, bytes: usize) {
        self.records.fetch_sub(records, AtomicOrdering::Relaxed);
        self.bytes.fetch_sub(bytes, AtomicOrdering::Relaxed);
    }

    pub fn get(&self) -> (usize, usize) {
        (
            self.records.load(AtomicOrdering::Relaxed),
            self.bytes.load(AtomicOrdering::Relaxed),
        )
    }
}

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

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub ordering: Ordering,
    pub mode: DeliveryMode,
    pub workers: usize,
    pub batch: BatchConfig,
}

pub struct Scheduler {
    settings: Settings,
    worker: Arc<Worker>,
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

impl Scheduler {
    pub fn new(settings: Settings, worker: Arc<Worker>, in_flight: Arc<InFlight>) -> Self {
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
        self.tasks.spawn(async move {
            worker.run(&job).await;
            let bytes = job.iter().map(Record::size).sum();
            let _ = done.send(Done {
                lanes,
                records: job.len(),
                bytes,
            });
        });
    }
}
