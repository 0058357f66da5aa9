//! Traces: one OpenTelemetry span per record delivery (`process <topic>`) and one per
//! dead-letter write (`send <dlq topic>`), exported over OTLP; [`logs`] puts their ids into
//! the log lines.
//!
//! The W3C `traceparent`/`tracestate` in a record's headers is the parent of its delivery
//! span; the delivery span's context goes to the app (HTTP headers), the dead-letter span's
//! into dead-lettered records. Export is off unless an endpoint is configured (`telemetry.otlp_endpoint` or the
//! standard `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`). Spans are exported from a background
//! batch with a bounded queue: a slow or absent collector drops spans, never blocks records.
//! Without export, the context in a record is still passed on unchanged.

pub mod logs;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceContextExt, TraceId, Tracer};
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

// Span names, kinds and attributes follow the OpenTelemetry semantic conventions for messaging
// and for Kafka, v1.44.0 (docs/messaging/messaging-spans.md and docs/messaging/kafka.md of
// open-telemetry/semantic-conventions, "Process span" and "Send span (producer)"):
// - the span name is `{messaging.operation.name} {messaging.destination.name}`;
// - the delivery of a record is a "Process" span (kind CONSUMER, operation type and name
//   `process`), its parent the record's creation context (the spec allows it for
//   single-message processing and asks to document it: README, Observability);
// - the write of a dead letter is a producer "Send" span (kind PRODUCER, operation `send`),
//   child of the delivery span, whose context goes into the dead letter as its creation context;
// - `error.type` (a low-cardinality class) is set if and only if the operation failed;
// - attributes the conventions do not define use the `kafka_sidecar.` namespace.

/// Longest record key recorded as `messaging.kafka.message.key`: span attributes are kept in
/// memory until exported, so a record's key (outside data, up to the record size) is not.
const MAX_KEY_ATTRIBUTE: usize = 256;

/// A record's key, as the `messaging.kafka.message.key` attribute: only when it has a
/// canonical string form (UTF-8), as the conventions ask, and is at most `MAX_KEY_ATTRIBUTE` bytes.
fn message_key(record: &Record) -> Option<String> {
    let key = record.key.as_ref().filter(|k| k.len() <= MAX_KEY_ATTRIBUTE)?;
    std::str::from_utf8(key).ok().map(str::to_string)
}

/// The delivery span of one record.
pub struct DeliverySpan {
    cx: Context,
}

impl DeliverySpan {
    /// Starts the span, child of the record's `traceparent` when it has one.
    pub fn start(record: &Record, group: &str) -> Self {
        // A record without headers has no trace context: the propagator would only hand back
        // the current context (skipped: its lock and extraction are per record).
        let parent = if record.headers.is_empty() {
            Context::current()
        } else {
            global::get_text_map_propagator(|p| p.extract(&RecordHeaders(record)))
        };
        if !EXPORTING.load(Ordering::Relaxed) {
            // What the no-op tracer would give: the parent's context, passed on unchanged.
            return Self { cx: parent };
        }
        let tracer = global::tracer("kafka-sidecar");
        let mut attributes = Vec::with_capacity(10);
        attributes.extend([
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.operation.type", "process"),
            KeyValue::new("messaging.operation.name", "process"),
            KeyValue::new("messaging.destination.name", record.topic.to_string()),
            KeyValue::new("messaging.destination.partition.id", record.partition.to_string()),
            KeyValue::new("messaging.consumer.group.name", group.to_string()),
            KeyValue::new("messaging.kafka.offset", record.offset),
        ]);
        if let Some(key) = message_key(record) {
            attributes.push(KeyValue::new("messaging.kafka.message.key", key));
        }
        if record.value.is_none() {
            attributes.push(KeyValue::new("messaging.kafka.message.tombstone", true));
        }
        let span = tracer
            .span_builder(format!("process {}", record.topic))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent);
        Self {
            cx: parent.with_span(span),
        }
    }

    /// `traceparent`/`tracestate` of this span, to pass downstream (empty when there is no trace).
    pub fn headers(&self) -> HashMap<String, String> {
        inject(&self.cx)
    }

    /// This span's context (the record's own without export): for metric exemplars.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// The trace id and the id of the span the delivery runs in, for log lines: this delivery
    /// span when spans are exported, else the record's own parent span; `None` when there is
    /// no trace (no empty fields are logged, and nothing is formatted into a String).
    pub fn log_ids(&self) -> Option<(TraceId, SpanId)> {
        let span = self.cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| (sc.trace_id(), sc.span_id()))
    }

    /// The record failed with error class `class` (`http_422`, `retries_exhausted`, ...):
    /// the span's `error.type`.
    pub fn set_error_class(&self, class: &str) {
        if EXPORTING.load(Ordering::Relaxed) {
            self.cx
                .span()
                .set_attribute(KeyValue::new("error.type", class.to_string()));
        }
    }

    /// Starts the span of the dead-letter write of this record (`send <dlq topic>`, a child
    /// of this span). Without export no span is built and the dead letter carries this
    /// delivery's context.
    pub fn dead_letter(&self, dlq_topic: &str) -> SendSpan {
        if !EXPORTING.load(Ordering::Relaxed) || !self.cx.span().span_context().is_valid() {
            return SendSpan { cx: None };
        }
        let tracer = global::tracer("kafka-sidecar");
        let span = tracer
            .span_builder(format!("send {dlq_topic}"))
            .with_kind(SpanKind::Producer)
            .with_attributes([
                KeyValue::new("messaging.system", "kafka"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.operation.name", "send"),
                KeyValue::new("messaging.destination.name", dlq_topic.to_string()),
            ])
            .start_with_context(&tracer, &self.cx);
        SendSpan {
            cx: Some(self.cx.with_span(span)),
        }
    }

    /// Ends the span with the record's outcome and the attempts it took. `error`: why the
    /// record was not processed (dead-lettered, abandoned); sets the span's error status and,
    /// unless [`set_error_class`](Self::set_error_class) did, `error.type` = the outcome.
    pub fn end(self, outcome: &str, attempts: u32, error: Option<&str>) {
        let span = self.cx.span();
        if !span.is_recording() {
            // Not exported (or the parent's remote span): the attributes would go nowhere, and
            // building them allocates per record.
            return;
        }
        span.set_attribute(KeyValue::new("kafka_sidecar.delivery.attempts", i64::from(attempts)));
        span.set_attribute(KeyValue::new("kafka_sidecar.delivery.outcome", outcome.to_string()));
        if let Some(e) = error {
            if outcome != "dead_lettered" {
                span.set_attribute(KeyValue::new("error.type", outcome.to_string()));
            }
            span.set_status(Status::error(e.to_string()));
        }
        span.end();
    }
}

/// The span of one dead-letter write (only built while spans are exported).
pub struct SendSpan {
    cx: Option<Context>,
}

impl SendSpan {
    /// `traceparent`/`tracestate` to write into the dead letter: this span, the dead letter's
    /// creation context. `None` without a span (the caller passes the delivery's context).
    pub fn headers(&self) -> Option<HashMap<String, String>> {
        self.cx.as_ref().map(inject)
    }

    /// Ends the span: written at `partition`/`offset` of the DLQ topic, or given up (`Err`:
    /// the error class, e.g. shutdown's grace period over).
    pub fn end(self, written: Result<(i32, i64), &str>) {
        let Some(cx) = self.cx else { return };
        let span = cx.span();
        match written {
            Ok((partition, offset)) => {
                span.set_attribute(KeyValue::new(
                    "messaging.destination.partition.id",
                    partition.to_string(),
                ));
                span.set_attribute(KeyValue::new("messaging.kafka.offset", offset));
            }
            Err(class) => {
                span.set_attribute(KeyValue::new("error.type", class.to_string()));
                span.set_status(Status::error(class.to_string()));
            }
        }
        span.end();
    }
}

fn inject(cx: &Context) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if cx.span().span_context().is_valid() {
        global::get_text_map_propagator(|p| p.inject_context(cx, &mut out));
    }
    out
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
    fn a_key_is_a_span_attribute_only_when_it_is_utf8_and_short() {
        let mut r = record(Vec::new());
        assert_eq!(message_key(&r), None, "no key, no attribute");
        r.key = Some(Bytes::from_static(b"order-1"));
        assert_eq!(message_key(&r).as_deref(), Some("order-1"));
        for nasty in [&b"\xff\xfe\x00"[..], b"\xc3\x28", b"ok\xed\xa0\x80"] {
            r.key = Some(Bytes::copy_from_slice(nasty));
            assert_eq!(message_key(&r), None, "{nasty:?} has no canonical string form");
        }
        r.key = Some(Bytes::from(vec![b'k'; MAX_KEY_ATTRIBUTE]));
        assert_eq!(message_key(&r).map(|k| k.len()), Some(MAX_KEY_ATTRIBUTE));
        r.key = Some(Bytes::from(vec![b'k'; MAX_KEY_ATTRIBUTE + 1]));
        assert_eq!(message_key(&r), None, "a long key is left out");
    }

    #[test]
    fn without_export_the_span_ids_for_logs_are_the_record_s_own_context() {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let span = DeliverySpan::start(&record(vec![("traceparent".into(), Some(Bytes::from(tp)))]), "g");
        let (trace, span_id) = span.log_ids().expect("the record's trace");
        assert_eq!(
            (trace.to_string(), span_id.to_string()),
            (
                "0af7651916cd43dd8448eb211c80319c".to_string(),
                "b7ad6b7169203331".to_string()
            )
        );
        let dlq = span.dead_letter("dlq");
        assert!(dlq.headers().is_none(), "no DLQ span is built without export");
        dlq.end(Ok((0, 1)));
        span.end("dead_lettered", 1, Some("http 422"));
        let hostile = [
            &b"00-zzzz"[..],
            b"\xff\xfe",
            b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        ];
        for bad in hostile {
            let span = DeliverySpan::start(
                &record(vec![("traceparent".into(), Some(Bytes::copy_from_slice(bad)))]),
                "g",
            );
            assert_eq!(span.log_ids(), None, "{bad:?}");
            assert!(span.headers().is_empty());
        }
    }

    #[test]
    fn without_export_a_record_s_trace_context_is_passed_on_unchanged() {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let span = DeliverySpan::start(&record(vec![("traceparent".into(), Some(Bytes::from(tp)))]), "g");
        assert_eq!(span.headers().get("traceparent").map(String::as_str), Some(tp));
        span.end("delivered", 1, None);

        let span = DeliverySpan::start(&record(Vec::new()), "g");
        assert!(span.headers().is_empty(), "no trace, nothing to pass on");
        assert_eq!(span.log_ids(), None);
    }
}
