//! Admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/status`.
//!
//! It runs on its own task, apart from the data path, so probes answer under load.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::breaker::Breaker;
use crate::connectivity::ConnectivityView;
use crate::dlq::DlqHealth;
use crate::metrics::{self, Metrics};
use crate::offsets::OffsetTracker;
use crate::pipeline::InFlight;
use crate::source::SourceState;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<OffsetTracker>,
    pub in_flight: Arc<InFlight>,
    pub source: Arc<SourceState>,
    pub breaker: Arc<Breaker>,
    /// Fired when shutdown begins: readiness goes false.
    pub shutdown: CancellationToken,
    /// Dead-lettering health; `None` without a DLQ. Not ready while the DLQ refuses records.
    pub dlq: Option<Arc<DlqHealth>>,
}

impl AdminState {
    fn ready(&self) -> bool {
        self.source.joined.load(Ordering::Relaxed)
            && !self.shutdown.is_cancelled()
            && self.dlq.as_ref().is_none_or(|d| d.healthy())
    }
}

/// Binds the admin port; the returned future serves until `stop` fires.
pub async fn serve(addr: SocketAddr, state: AdminState, stop: CancellationToken) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("failed to bind the admin server on {addr} (admin.listen): {e}"))?;
    tracing::info!(%addr, "admin server listening");
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok(())
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// `/metrics`: OpenMetrics (with exemplars) when the scraper accepts it, as Prometheus does;
/// else the classic text format (no exemplars), which `curl` and `promtool` get.
async fn metrics_text(State(s): State<AdminState>, headers: HeaderMap) -> impl IntoResponse {
    s.metrics.ready.set(i64::from(s.ready()));
    s.metrics.breaker_state.set(s.breaker.state().as_gauge());
    s.metrics.kafka_connected.set(i64::from(s.source.kafka.is_connected()));
    let accept = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok());
    if accepts_openmetrics(accept) {
        (
            [(header::CONTENT_TYPE, metrics::OPENMETRICS_CONTENT_TYPE)],
            s.metrics.encode_openmetrics(),
        )
    } else {
        ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], s.metrics.encode())
    }
}

/// Whether an `Accept` header lists `application/openmetrics-text` with a quality above 0.
fn accepts_openmetrics<'a>(accept: impl Iterator<Item = &'a str>) -> bool {
    accept.flat_map(|v| v.split(',')).any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

async fn status(State(s): State<AdminState>) -> impl IntoResponse {
    let (records, bytes) = s.in_flight.get();
    let partitions: Vec<_> = s
        .tracker
        .snapshot()
        .into_iter()
        .map(|p| {
            json!({
                "topic": &*p.tp.topic,
                "partition": p.tp.partition,
                "committed": p.committed,
                "position": p.next,
                "commit_position": p.position,
                "high_watermark": p.high_watermark,
                "lag": p.lag,
                "lag_seconds": p.lag_seconds,
                "unfinished": p.pending,
            })
        })
        .collect();
    Json(json!({
        "ready": s.ready(),
        "paused": s.source.paused.load(Ordering::Relaxed),
        "breaker": s.breaker.state().as_str(),
        "kafka": kafka_status(&s.source.kafka.view()),
        "shutting_down": s.shutdown.is_cancelled(),
        "in_flight": { "records": records, "bytes": bytes },
        "partitions": partitions,
        "dlq": s.dlq.as_ref().map(|d| dlq_status(d)),
    }))
}

/// `/status` `dlq`: `healthy` is false while records are kept because the DLQ topic refuses
/// them (`error_class`, `fix`, `blocked_records`); `values_dropped` counts records dead-lettered
/// without their value.
fn dlq_status(d: &DlqHealth) -> serde_json::Value {
    let st = d.status();
    json!({
        "topic": st.topic,
        "healthy": st.healthy,
        "error_class": st.error_class,
        "fix": st.fix,
        "blocked_records": st.blocked_records,
        "values_dropped": st.values_dropped,
    })
}

/// `"kafka"` in `/status`: `connected`, `since` (RFC 3339, UTC) and `error` (null while connected).
fn kafka_status(v: &ConnectivityView) -> serde_json::Value {
    json!({
        "connected": v.connected,
        "since": humantime::format_rfc3339_seconds(v.since).to_string(),
        // librdkafka's text; scrubbed of every configured secret like the log.
        "error": v.error.as_deref().map(|e| crate::config::redact::scrub(e).into_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::accepts_openmetrics;

    #[test]
    fn openmetrics_is_served_only_to_scrapers_that_accept_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(accepts_openmetrics([prometheus].into_iter()));
        assert!(accepts_openmetrics(
            ["text/plain", "Application/OpenMetrics-Text"].into_iter()
        ));
        assert!(!accepts_openmetrics(["*/*"].into_iter()));
        assert!(!accepts_openmetrics(["text/plain;version=0.0.4"].into_iter()));
        assert!(!accepts_openmetrics(["application/openmetrics-text;q=0"].into_iter()));
        assert!(!accepts_openmetrics(
            ["\u{0}\u{ff};;,=q=;q=".to_string().as_str()].into_iter()
        ));
        assert!(!accepts_openmetrics(std::iter::empty()));
    }
}
