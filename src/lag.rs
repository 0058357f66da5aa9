//! Lag monitor: refreshes partition end offsets on an interval, from its own connection, so
//! lag is current even when partitions are paused or no records flow (a paused partition
//! fetches nothing, so the consumer's own view of the end offset goes stale).
//!
//! Lag in records = high watermark − committed position; lag in seconds = age of the oldest
//! unfinished record (see [`crate::offsets`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::offsets::OffsetTracker;
use crate::source::connection_config;

/// Starts the monitor thread; it stops when `stop` fires.
pub fn spawn(
    cfg: &Config,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let client: BaseConsumer = connection_config(cfg, "-lag").create().map_err(|e| {
        let e = crate::config::redact::kafka_error(&e, "kafka.properties");
        anyhow::anyhow!("failed to create the lag monitor client: {e}")
    })?;
    let interval = cfg.admin.lag_interval;
    std::thread::Builder::new().name("lag-monitor".into()).spawn(move || {
        while !stop.is_cancelled() {
            let started = Instant::now();
            for tp in tracker.partitions() {
                match client.fetch_watermarks(&tp.topic, tp.partition, Duration::from_secs(5)) {
                    Ok((_low, high)) => tracker.set_high_watermark(&tp, high),
                    Err(e) => tracing::debug!(topic = %tp.topic, partition = tp.partition, error = %e, "cannot read the partition end offset"),
                }
            }
            metrics.set_partitions(&tracker.snapshot());
            while started.elapsed() < interval && !stop.is_cancelled() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    })?;
    Ok(())
}
