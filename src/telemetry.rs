//! Traces: one OpenTelemetry span per record delivery, exported over OTLP.
//!
//! The W3C `traceparent`/`tracestate` in a record's headers is the parent of its delivery
//! span; the delivery span's context goes to the app (HTTP headers) and into dead-lettered
//! records. Export is off unless an endpoint is configured (`telemetry.otlp_endpoint` or the
//! standard `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`). Spans are exported from a background
//! batch with a bounded queue: a slow or absent collector drops spans, never blocks records.
//! Without export, the context in a record is still passed on unchanged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{global, Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;

pub use crate::config::TelemetryConfig;
use crate::record::Record;

/// Spans are exported (a tracer provider is installed). Without export a delivery span would
/// be a no-op carrying its parent's context; skipping it saves per-record allocations.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Installs the global tracer provider when an endpoint is configured. Call inside the runtime.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let from_env = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if cfg.otlp_endpoint.is_empty() && from_env.is_none() {
        return Ok(None);
    }
    let protocol = Some(cfg.protocol.clone())
        .filter(|p| !p.is_empty())
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| "http/protobuf".into());
    let builder = opentelemetry_otlp::SpanExporter::builder();
    let exporter = match protocol.as_str() {
        "grpc" => {
            let b = builder.with_tonic().with_timeout(Duration::from_secs(5));
            if cfg.otlp_endpoint.is_empty() {
                b
            } else {
                b.with_endpoint(&cfg.otlp_endpoint)
            }
            .build()
        }
        p => {
            let proto = if p == "http/json" {
                Protocol::HttpJson
            } else {
                Protocol::HttpBinary
            };
            let b = builder
                .with_http()
                .with_protocol(proto)
                .with_timeout(Duration::from_secs(5));
            if cfg.otlp_endpoint.is_empty() {
                b
            } else {
                b.with_endpoint(&cfg.otlp_endpoint)
            }
            .build()
        }
    }
    .map_err(|e| anyhow::anyhow!("failed to set up the OTLP exporter (telemetry.*): {e}"))?;

    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(cfg.service_name.clone());
    }
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if env("OTEL_TRACES_SAMPLER").is_none() {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))));
    }
    let provider = provider.build();
    global::set_tracer_provider(provider.clone());
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(protocol, endpoint = %crate::config::redact::url(&if cfg.otlp_endpoint.is_empty() { from_env.unwrap_or_default() } else { cfg.otlp_endpoint.clone() }), "exporting traces over OTLP");
    Ok(Some(provider))
}

/// Flushes and stops the exporter (shutdown).
pub fn shutdown(provider: Option<SdkTracerProvider>) {
    if let Some(p) = provider {
        if let Err(e) = p.shutdown_with_timeout(Duration::from_secs(3)) {
            tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
        }
    }
}

struct RecordHeaders<'a>(&'a Record);

impl Extractor for RecordHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header_str(key)
    }

    fn keys(&self) -> Vec<&str> {
        // Names that are not UTF-8 cannot be trace context keys.
        self.0
            .headers
            .iter()
            .filter_map(|(k, _)| std::str::from_utf8(k).ok())
            .collect()
    }
}

/// The delivery span of one record.
pub struct DeliverySpan {
    cx: Context,
}

impl DeliverySpan {
    /// Starts the span, child of the record's `traceparent` when it has one.
    pub fn start(record: &Record, group: &str) -> Self {
        let parent = global::get_text_map_propagator(|p| p.extract(&RecordHeaders(record)));
        if !EXPORTING.load(Ordering::Relaxed) {
            // What the no-op tracer would give: the parent's context, passed on unchanged.
            return Self { cx: parent };
        }
        let tracer = global::tracer("kafka-sidecar");
        let span = tracer
            .span_builder(format!("process {}", record.topic))
            .with_kind(SpanKind::Consumer)
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "process"),
                KeyValue::new("messaging.destination.name", record.topic.to_string()),
                KeyValue::new("messaging.destination.partition.id", record.partition.to_string()),
                KeyValue::new("messaging.kafka.offset", record.offset),
                KeyValue::new("messaging.consumer.group.name", group.to_string()),
            ])
            .start_with_context(&tracer, &parent);
        Self {
            cx: parent.with_span(span),
        }
    }

    /// `traceparent`/`tracestate` of this span, to pass downstream (empty when there is no trace).
    pub fn headers(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        if self.cx.span().span_context().is_valid() {
            global::get_text_map_propagator(|p| p.inject_context(&self.cx, &mut out));
        }
        out
    }

    /// This span's context (the record's own without export): for metric exemplars.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// The trace id, for log lines (empty when there is no trace).
    pub fn trace_id(&self) -> String {
        let sc = self.cx.span().span_context().clone();
        if sc.is_valid() {
            sc.trace_id().to_string()
        } else {
            String::new()
        }
    }

    /// Ends the span with the record's outcome and the attempts it took.
    pub fn end(self, outcome: &str, attempts: u32, error: Option<&str>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("messaging.kafka.sidecar.attempts", i64::from(attempts)));
        span.set_attribute(KeyValue::new("messaging.kafka.sidecar.outcome", outcome.to_string()));
        if let Some(e) = error {
            span.set_status(Status::error(e.to_string()));
        }
        span.end();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn record(headers: Vec<(Bytes, Option<Bytes>)>) -> Record {
        Record {
            topic: Arc::from("t"),
            partition: 0,
            offset: 1,
            timestamp_ms: None,
            key: None,
            value: None,
            headers,
            generation: 1,
        }
    }

    #[test]
    fn without_export_a_record_s_trace_context_is_passed_on_unchanged() {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let span = DeliverySpan::start(&record(vec![("traceparent".into(), Some(Bytes::from(tp)))]), "g");
        assert_eq!(span.headers().get("traceparent").map(String::as_str), Some(tp));
        assert_eq!(span.trace_id(), "0af7651916cd43dd8448eb211c80319c");
        span.end("delivered", 1, None);

        let span = DeliverySpan::start(&record(Vec::new()), "g");
        assert!(span.headers().is_empty(), "no trace, nothing to pass on");
        assert_eq!(span.trace_id(), "");
    }
}
