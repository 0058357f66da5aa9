//! Wires the pipeline together and owns the one shutdown path:
//! signal → stop reading → drain under the grace period → commit → leave the group (and
//! meanwhile flush the DLQ producer) → return, all within `shutdown.grace_period`.
//!
//! The same path runs when a part stops on its own (the poll thread panicked or stopped
//! reading, the scheduler ended): what is finished is still committed, the group is left and
//! the DLQ producer flushed, and `run` returns an error naming what stopped, so the process
//! exits non-zero and its supervisor restarts it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::breaker::Breaker;
use crate::config::Config;
use crate::dedup::{Dedup, Gate};
use crate::delivery::AppClient;
use crate::dlq::DeadLetters;
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::pipeline::InFlight;
use crate::ratelimit::RateLimiter;
use crate::retry_topics::Tiers;
use crate::scheduler::{Scheduler, Settings};
use crate::source::{self, Limits, PollLoop, PollThread, SourceState};
use crate::worker::Worker;
use crate::{lag, telemetry};

/// Runs the sidecar until `shutdown` fires, then shuts down gracefully.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let tracker = Arc::new(OffsetTracker::default());
    let in_flight = Arc::new(InFlight::default());
    let state = Arc::new(SourceState::new(&cfg.kafka.brokers));
    let hard_stop = CancellationToken::new();
    let close = CancellationToken::new();
    let tracer = telemetry::init(&cfg.telemetry)?;

    let breaker = Arc::new(Breaker::new(cfg.breaker.clone()));
    let dedup = if cfg.dedup.enabled {
        let store = Dedup::connect_lazy(&cfg.dedup, &cfg.kafka.group_id).await?;
        if let Err(e) = store.ping().await {
            tracing::warn!(error = %e, store = store.target(), "dedup store not reachable yet; deliveries wait for it (dedup.on_error = \"pause\") or go out without dedup (\"deliver\")");
        }
        Some(Gate::new(store, cfg.dedup.on_error, metrics.clone()))
    } else {
        None
    };
    let tiers = Tiers::from_config(&cfg.retry_topics);
    if let Some(t) = &tiers {
        metrics.set_retry_tiers(t.all().iter().map(|t| (t.topic.clone(), t.delay)).collect());
    }
    let worker = Arc::new(Worker {
        app: AppClient::new(&cfg.app, &cfg.kafka.group_id).context("failed to build the HTTP client (app.*)")?,
        dlq: DeadLetters::from_config(&cfg, metrics.clone())?,
        tracker: tracker.clone(),
        retry: cfg.retry.clone(),
        metrics: metrics.clone(),
        breaker: breaker.clone(),
        limiter: RateLimiter::new(&cfg.rate_limit, cfg.pipeline.workers),
        group: cfg.kafka.group_id.clone(),
        hard_stop: hard_stop.clone(),
        dedup,
        key_source: cfg.dedup.key_source(),
        tiers: tiers.clone(),
    });
    // The in-flight bound keeps this channel from ever filling; the slack covers control messages.
    let (input_tx, input_rx) = mpsc::channel(cfg.pipeline.max_in_flight_records + 64);
    let consumer = source::create_consumer(&cfg, tracker.clone(), input_tx.clone(), state.clone(), metrics.clone())?;

    if !cfg.admin.listen.is_empty() {
        let addr = cfg.admin.listen.parse().context("admin.listen")?;
        let admin_state = AdminState {
            metrics: metrics.clone(),
            tracker: tracker.clone(),
            in_flight: in_flight.clone(),
            source: state.clone(),
            breaker: breaker.clone(),
            shutdown: shutdown.clone(),
            dlq: worker.dlq.as_ref().map(DeadLetters::health),
        };
        admin::serve(addr, admin_state, close.clone()).await?;
    }

    lag::spawn(
        &cfg,
        tracker.clone(),
        metrics.clone(),
        state.kafka.clone(),
        close.clone(),
    )?;

    // Readiness gate: do not join the group before the app can take records.
    if !cfg.app.health_url.is_empty() && !worker.app.wait_healthy(&cfg.app.health_url, &shutdown).await {
        close.cancel();
        telemetry::shutdown(tracer);
        tracing::info!("shut down before the app became healthy");
        return Ok(());
    }

    let settings = Settings {
        ordering: cfg.pipeline.ordering,
        mode: cfg.app.mode,
        workers: cfg.pipeline.workers,
        batch: cfg.batch.clone(),
    };
    let scheduler = tokio::spawn(Scheduler::new(settings, worker.clone(), in_flight.clone()).run(input_rx));
    // The retry tier topics are read by the same consumer, in the same group.
    let mut topics = cfg.kafka.topics.clone();
    topics.extend(tiers.iter().flat_map(|t| t.topics().map(str::to_string)));
    let poll = PollLoop {
        consumer,
        topics,
        tiers,
        brokers: cfg.kafka.brokers.clone(),
        input: input_tx,
        tracker: tracker.clone(),
        in_flight: in_flight.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
        limits: Limits::from_config(&cfg),
        breaker,
        commit_interval: cfg.kafka.commit_interval,
        stop: shutdown.clone(),
        close: close.clone(),
    }
    .spawn()
    .context("failed to start the poll thread")?;

    let mut stop = Shutdown {
        scheduler: Some(scheduler),
        poll,
        fault: None,
    };
    stop.wait_for_stop(&shutdown).await;
    let deadlines = Deadlines::new(cfg.shutdown.grace_period);
    state.begin_shutdown(deadlines.drain.into_std(), deadlines.commit.into_std(), &tracker);
    let (records, _) = in_flight.get();
    tracing::info!(in_flight = records, grace = ?cfg.shutdown.grace_period, "shutting down: finishing records already read");
    stop.drain(&deadlines, &hard_stop, &in_flight).await;
    close.cancel();
    // The DLQ flush runs while the poll thread commits and closes the consumer.
    if let Some(dlq) = &worker.dlq {
        let dlq_flush = deadlines.reserve / 2;
        tokio::task::block_in_place(|| dlq.flush(dlq_flush));
    }
    stop.close_consumer(deadlines.exit).await;
    telemetry::shutdown(tracer);
    match stop.fault {
        None => {
            tracing::info!("shutdown complete");
            Ok(())
        }
        Some(fault) => {
            tracing::error!(fault = %fault, "shut down after a fault; exiting with status 1");
            Err(anyhow::anyhow!("stopped because {fault}"))
        }
    }
}

/// How the grace period is spent once shutdown began.
struct Deadlines {
    /// The last part of the grace period (a quarter, at most 5 s), kept for the final commit,
    /// the group leave and the DLQ flush.
    reserve: Duration,
    /// Records still unfinished then are abandoned (`hard_stop`); revoke drains end by then.
    drain: Instant,
    /// A final commit refused by a rebalance is retried until then.
    commit: Instant,
    /// The consumer must be closed (the group left) by then: the end of the grace period.
    exit: Instant,
}

impl Deadlines {
    fn new(grace: Duration) -> Self {
        let reserve = (grace / 4).min(Duration::from_secs(5));
        let now = Instant::now();
        Self {
            reserve,
            drain: later(now, grace - reserve),
            commit: later(now, grace - reserve / 4),
            exit: later(now, grace),
        }
    }
}

/// The running parts during shutdown, and the first fault seen.
struct Shutdown {
    /// `None` once awaited: a `JoinHandle` must not be polled after it completed.
    scheduler: Option<JoinHandle<()>>,
    poll: PollThread,
    /// What stopped on its own (the process exits non-zero).
    fault: Option<String>,
}

impl Shutdown {
    /// Waits for the shutdown signal, or for the poll thread or the scheduler to stop on
    /// their own, which is a fault and starts the shutdown.
    async fn wait_for_stop(&mut self, shutdown: &CancellationToken) {
        let Some(scheduler) = self.scheduler.as_mut() else {
            return;
        };
        let (fault, scheduler_ended) = tokio::select! {
            // First: a part that ends after the signal ends because of it.
            biased;
            _ = shutdown.cancelled() => (None, false),
            result = scheduler => (Some(scheduler_fault(result)), true),
            failed = &mut self.poll.failed => {
                (Some(failed.unwrap_or_else(|_| "the Kafka poll thread died".into())), false)
            }
        };
        if scheduler_ended {
            self.scheduler = None;
        }
        if let Some(fault) = fault {
            tracing::error!(fault = %fault, "a part of the pipeline stopped; shutting down");
            self.fault.get_or_insert(fault);
            shutdown.cancel();
        }
    }

    /// Lets the scheduler finish the records already read until `deadline`, then abandons
    /// the rest (not committed; delivered again after the restart).
    async fn drain(&mut self, deadlines: &Deadlines, hard_stop: &CancellationToken, in_flight: &InFlight) {
        let Some(mut scheduler) = self.scheduler.take() else {
            // No scheduler: nothing will report the jobs still running; stop them.
            hard_stop.cancel();
            return;
        };
        let result = match tokio::time::timeout_at(deadlines.drain, &mut scheduler).await {
            Ok(result) => result,
            Err(_) => {
                let (records, _) = in_flight.get();
                tracing::warn!(
                    unfinished = records,
                    "grace period over; unfinished records are not committed and will be delivered again"
                );
                hard_stop.cancel();
                // Jobs stop at once on the hard stop; do not eat into the commit's time.
                match tokio::time::timeout(deadlines.reserve / 4, scheduler).await {
                    Ok(result) => result,
                    Err(_) => return,
                }
            }
        };
        if let Err(e) = result {
            self.fault.get_or_insert(scheduler_fault(Err(e)));
        }
    }

    /// Waits (until `deadline`) for the poll thread's final commit and group leave.
    async fn close_consumer(&mut self, deadline: Instant) {
        match tokio::time::timeout_at(deadline, &mut self.poll.closed).await {
            Ok(Ok(None)) => {}
            Ok(Ok(Some(problem))) => {
                self.fault.get_or_insert(problem);
            }
            Ok(Err(_)) => {
                self.fault
                    .get_or_insert("the Kafka poll thread died before closing the consumer".into());
            }
            Err(_) => tracing::error!("the Kafka consumer did not close in time"),
        }
        // A stop reason the poll thread reported after the wait for the signal was over.
        if let Ok(reason) = self.poll.failed.try_recv() {
            self.fault.get_or_insert(reason);
        }
    }
}

/// `now + d`, or a far-off instant when that does not fit.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

fn scheduler_fault(result: Result<(), JoinError>) -> String {
    match result {
        Ok(()) => "the scheduler stopped unexpectedly".into(),
        Err(e) if e.is_panic() => format!(
            "the scheduler panicked: {}",
            crate::pipeline::panic_message(&*e.into_panic())
        ),
        Err(e) => format!("the scheduler task failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;

    fn parts(scheduler: JoinHandle<()>) -> (Shutdown, oneshot::Sender<String>, oneshot::Sender<Option<String>>) {
        let (failed_tx, failed) = oneshot::channel();
        let (closed_tx, closed) = oneshot::channel();
        let stop = Shutdown {
            scheduler: Some(scheduler),
            poll: PollThread { failed, closed },
            fault: None,
        };
        (stop, failed_tx, closed_tx)
    }

    #[tokio::test]
    async fn a_scheduler_that_panics_is_a_fault_and_its_handle_is_not_polled_again() {
        let (mut stop, _failed, closed) = parts(tokio::spawn(async { panic!("boom") }));
        let shutdown = CancellationToken::new();
        stop.wait_for_stop(&shutdown).await;
        assert!(shutdown.is_cancelled(), "the fault starts the shutdown");
        let hard_stop = CancellationToken::new();
        // Used to await the finished JoinHandle again: "JoinHandle polled after completion".
        let deadlines = Deadlines::new(Duration::from_secs(4));
        stop.drain(&deadlines, &hard_stop, &InFlight::default()).await;
        assert!(hard_stop.is_cancelled(), "jobs nobody reports on are stopped");
        closed.send(None).unwrap();
        stop.close_consumer(deadlines.exit).await;
        assert_eq!(stop.fault.as_deref(), Some("the scheduler panicked: boom"));
    }

    #[tokio::test]
    async fn a_poll_thread_that_stops_on_its_own_is_a_fault_and_the_scheduler_still_drains() {
        let (mut stop, failed, closed) = parts(tokio::spawn(tokio::time::sleep(Duration::from_millis(50))));
        failed
            .send("the Kafka poll thread panicked: bad header".into())
            .unwrap();
        let shutdown = CancellationToken::new();
        stop.wait_for_stop(&shutdown).await;
        assert!(shutdown.is_cancelled());
        let hard_stop = CancellationToken::new();
        let deadlines = Deadlines::new(Duration::from_secs(20));
        stop.drain(&deadlines, &hard_stop, &InFlight::default()).await;
        assert!(!hard_stop.is_cancelled(), "the scheduler finished its records in time");
        closed.send(None).unwrap();
        stop.close_consumer(deadlines.exit).await;
        assert_eq!(
            stop.fault.as_deref(),
            Some("the Kafka poll thread panicked: bad header")
        );
    }

    #[tokio::test]
    async fn parts_that_end_because_of_the_signal_are_no_fault() {
        let (mut stop, failed, closed) = parts(tokio::spawn(async {}));
        drop(failed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        stop.wait_for_stop(&shutdown).await;
        let deadlines = Deadlines::new(Duration::from_secs(4));
        stop.drain(&deadlines, &CancellationToken::new(), &InFlight::default())
            .await;
        closed.send(None).unwrap();
        stop.close_consumer(deadlines.exit).await;
        assert_eq!(stop.fault, None);
    }

    #[tokio::test]
    async fn a_problem_while_closing_the_consumer_is_a_fault() {
        let (mut stop, _failed, closed) = parts(tokio::spawn(async {}));
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        stop.wait_for_stop(&shutdown).await;
        closed.send(Some("the final offset commit panicked: x".into())).unwrap();
        stop.close_consumer(later(Instant::now(), Duration::from_secs(5))).await;
        assert_eq!(stop.fault.as_deref(), Some("the final offset commit panicked: x"));
    }

    #[test]
    fn the_grace_period_ends_with_the_drain_then_the_commit_then_the_exit() {
        let d = Deadlines::new(Duration::from_secs(8));
        assert_eq!(d.reserve, Duration::from_secs(2));
        assert!(d.drain < d.commit && d.commit < d.exit);
        assert_eq!(d.exit - d.drain, d.reserve);
        let d = Deadlines::new(Duration::from_secs(60));
        assert_eq!(d.reserve, Duration::from_secs(5), "at most 5 s");
        let d = Deadlines::new(Duration::MAX);
        assert!(d.drain <= d.exit, "a huge grace period does not overflow");
    }
}
