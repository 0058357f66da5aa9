//! Wires the pipeline together and owns the one shutdown path:
//! signal → stop reading → drain under the grace period → commit → leave the group →
//! flush the DLQ producer → return.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::breaker::Breaker;
use crate::config::Config;
use crate::dedup::{Dedup, Gate};
use crate::delivery::AppClient;
use crate::dlq::DeadLetters;
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::ratelimit::RateLimiter;
use crate::scheduler::{InFlight, Scheduler, Settings};
use crate::source::{self, Limits, PollLoop, SourceState};
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
    let worker = Arc::new(Worker {
        app: AppClient::new(&cfg.app, &cfg.kafka.group_id).context("failed to build the HTTP client (app.*)")?,
        dlq: DeadLetters::from_config(&cfg)?,
        tracker: tracker.clone(),
        retry: cfg.retry.clone(),
        metrics: metrics.clone(),
        breaker: breaker.clone(),
        limiter: RateLimiter::new(&cfg.rate_limit, cfg.pipeline.workers),
        group: cfg.kafka.group_id.clone(),
        hard_stop: hard_stop.clone(),
        dedup,
        key_source: cfg.dedup.key_source(),
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
    let mut scheduler = tokio::spawn(Scheduler::new(settings, worker.clone(), in_flight.clone()).run(input_rx));
    let poll_done = PollLoop {
        consumer,
        topics: cfg.kafka.topics.clone(),
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

    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = &mut scheduler => {
            tracing::error!("scheduler stopped unexpectedly; shutting down");
            shutdown.cancel();
        }
    }

    // Leave a slice of the grace period for the commit, the group leave and the DLQ flush.
    let grace = cfg.shutdown.grace_period;
    let reserve = (grace / 4).min(Duration::from_secs(5));
    let (records, _) = in_flight.get();
    tracing::info!(in_flight = records, grace = ?grace, "shutting down: finishing records already read");
    if tokio::time::timeout(grace - reserve, &mut scheduler).await.is_err() {
        let (records, _) = in_flight.get();
        tracing::warn!(
            unfinished = records,
            "grace period over; unfinished records are not committed and will be delivered again"
        );
        hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut scheduler).await;
    }
    close.cancel();
    if tokio::time::timeout(reserve, poll_done).await.is_err() {
        tracing::error!("the Kafka consumer did not close in time");
    }
    if let Some(dlq) = &worker.dlq {
        let dlq_flush = reserve / 2;
        tokio::task::block_in_place(|| dlq.flush(dlq_flush));
    }
    telemetry::shutdown(tracer);
    tracing::info!("shutdown complete");
    Ok(())
}
