//! The pipeline's shared types: what the poll thread ([`crate::source`]) hands to the
//! scheduler ([`crate::scheduler`]), the in-flight bound both of them keep, and the trait the
//! scheduler runs its jobs on (implemented by [`crate::worker`]).
//!
//! Guaranteed: this module depends on no pipeline stage (only on the record and offset
//! types), so the source, the scheduler and the worker can each be built and tested alone
//! against it. `tests/architecture.rs` checks that this module imports no stage and that no
//! stage imports another.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use crate::offsets::TopicPartition;
use crate::record::Record;

/// Runs the scheduler's jobs: the worker in the sidecar, a fake in tests.
pub trait JobRunner: Send + Sync + 'static {
    /// Runs a job (records in lane order) to its end: every record finished, revoked, or
    /// abandoned at shutdown's hard stop.
    fn run(&self, job: &[Record]) -> impl Future<Output = ()> + Send;

    /// `run` panicked on this job, `panics` times in a row. Count and log it, wait before the
    /// next try, and return whether to run the job again. Returning false must leave no record
    /// to be committed unfinished: dead-letter what is left, or abandon it (not committed, so
    /// read again after a restart). A job of several records is run again one record at a time.
    fn after_panic(&self, job: &[Record], panics: u32, message: &str) -> impl Future<Output = bool> + Send;
}

/// What the poll thread sends to the scheduler.
#[derive(Debug)]
pub enum Input {
    /// Records read, in read order: a run of what one stretch of polls returned (one
    /// message per run, not per record: each message costs a channel push and may wake the
    /// scheduler).
    Records(Vec<Record>),
    /// These partitions were revoked: drop their queued records.
    Revoked(Vec<TopicPartition>),
    /// Shutdown: nothing more will be read; finish what is queued, then stop.
    End,
}

/// Records and bytes read and not yet finished: the memory bound.
///
/// The poll thread holding at the limit sleeps in [`InFlight::wait_for_release`] until the
/// counts are down to the target it waits for, and is woken by the release that gets them
/// there: one wake-up per refill, not per finished record. A release costs one atomic load
/// unless the poll thread is waiting.
#[derive(Debug, Default)]
pub struct InFlight {
    pub records: AtomicUsize,
    pub bytes: AtomicUsize,
    /// The poll thread waits on `released` (with `hold` locked) while this is set.
    holding: AtomicBool,
    /// The counts the waiting poll thread waits for (at most these), set before `holding`.
    target_records: AtomicUsize,
    target_bytes: AtomicUsize,
    hold: Mutex<()>,
    released: Condvar,
}

impl InFlight {
    pub fn add(&self, bytes: usize) {
        self.records.fetch_add(1, AtomicOrdering::SeqCst);
        self.bytes.fetch_add(bytes, AtomicOrdering::SeqCst);
    }

    /// Releases finished records (the scheduler, when a job ends or a lane is revoked).
    pub(crate) fn release(&self, records: usize, bytes: usize) {
        self.records.fetch_sub(records, AtomicOrdering::SeqCst);
        self.bytes.fetch_sub(bytes, AtomicOrdering::SeqCst);
        // SeqCst pairs with `wait_for_release`: either this load sees `holding` set (and the
        // target stored before it), or the waiter's check (after it set `holding`) sees the
        // counts just released. Only the poll thread adds, and it is the waiter, so counts
        // above the target now are brought down to it by a later release, which wakes it.
        if self.holding.load(AtomicOrdering::SeqCst) && self.reached(self.target()) {
            let _hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
            self.released.notify_all();
        }
    }

    fn target(&self) -> (usize, usize) {
        (
            self.target_records.load(AtomicOrdering::SeqCst),
            self.target_bytes.load(AtomicOrdering::SeqCst),
        )
    }

    /// Whether at most `target` records and bytes are in flight.
    fn reached(&self, (records, bytes): (usize, usize)) -> bool {
        let (r, b) = self.get();
        r <= records && b <= bytes
    }

    pub fn get(&self) -> (usize, usize) {
        (
            self.records.load(AtomicOrdering::SeqCst),
            self.bytes.load(AtomicOrdering::SeqCst),
        )
    }

    /// Blocks the calling thread until at most `target` records and bytes are in flight, or
    /// `timeout` passes. For the poll thread holding at the limit.
    pub fn wait_for_release(&self, target: (usize, usize), timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        self.target_records.store(target.0, AtomicOrdering::SeqCst);
        self.target_bytes.store(target.1, AtomicOrdering::SeqCst);
        self.holding.store(true, AtomicOrdering::SeqCst);
        while !self.reached(target) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            hold = self
                .released
                .wait_timeout(hold, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        self.holding.store(false, AtomicOrdering::SeqCst);
    }
}

/// The message of a panic payload (`panic!` with a literal or a formatted message).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".into())
}
