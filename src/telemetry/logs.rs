//! Log/trace correlation: JSON log lines written inside a delivery carry the trace id and the
//! delivery span id as top-level `trace_id` and `span_id` fields, so a log line leads to its
//! trace (and a trace's span to its log lines).
//!
//! The ids come from the `trace_id`/`span_id` fields of the enclosing `tracing` spans (the
//! worker's `delivery` and `record` spans, filled from the OpenTelemetry span context):
//! [`TraceIdLayer`] keeps them with each span, and [`JsonWithTraceIds`] writes the innermost
//! span's ids in front of tracing-subscriber's own JSON line. Lines outside any such span are
//! written unchanged.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

/// The trace ids of one `tracing` span.
struct TraceIds {
    trace_id: String,
    span_id: String,
}

#[derive(Default)]
struct IdVisitor {
    trace_id: Option<String>,
    span_id: Option<String>,
}

/// Only lowercase hex ids of the W3C lengths are kept (they are written into JSON unescaped).
fn hex_id(value: String, len: usize) -> Option<String> {
    (value.len() == len && value.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(value)
}

impl Visit for IdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `%value` fields arrive here; their Debug form is their Display form.
        if matches!(field.name(), "trace_id" | "span_id") {
            self.record(field, format!("{value:?}"));
        }
    }
}

impl IdVisitor {
    fn record(&mut self, field: &Field, value: String) {
        match field.name() {
            "trace_id" => self.trace_id = hex_id(value, 32),
            "span_id" => self.span_id = hex_id(value, 16),
            _ => {}
        }
    }
}

/// Keeps the `trace_id`/`span_id` fields of every new span that has both (and valid ones).
pub struct TraceIdLayer;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for TraceIdLayer {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut ids = IdVisitor::default();
        attrs.record(&mut ids);
        if let (Some(trace_id), Some(span_id), Some(span)) = (ids.trace_id, ids.span_id, ctx.span(id)) {
            span.extensions_mut().insert(TraceIds { trace_id, span_id });
        }
    }
}

/// tracing-subscriber's JSON line, with `trace_id` and `span_id` of the innermost enclosing
/// span that has them as its first fields.
pub struct JsonWithTraceIds {
    inner: Format<Json>,
}

impl JsonWithTraceIds {
    pub fn new(inner: Format<Json>) -> Self {
        Self { inner }
    }
}

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let ids = ctx.event_scope().and_then(|mut scope| {
            scope.find_map(|span| {
                span.extensions()
                    .get::<TraceIds>()
                    .map(|ids| format!("{{\"trace_id\":\"{}\",\"span_id\":\"{}\",", ids.trace_id, ids.span_id))
            })
        });
        let Some(prefix) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => {
                writer.write_str(&prefix)?;
                writer.write_str(rest)
            }
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| io::Error::other("poisoned"))?
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let buffer = Buffer::default();
        let out = buffer.clone();
        let subscriber = tracing_subscriber::registry().with(TraceIdLayer).with(
            tracing_subscriber::fmt::layer()
                .json()
                .event_format(JsonWithTraceIds::new(tracing_subscriber::fmt::format().json()))
                .with_writer(move || out.clone()),
        );
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";
    const INNER: &str = "b7ad6b7169203331";

    #[test]
    fn json_lines_inside_a_delivery_carry_the_innermost_span_s_trace_and_span_ids() {
        let lines = lines(|| {
            tracing::info!("outside");
            let delivery = tracing::info_span!("delivery", topic = "t", trace_id = %TRACE, span_id = %SPAN);
            let _d = delivery.enter();
            tracing::warn!(attempt = 2, "retrying");
            let record = tracing::info_span!("record", trace_id = %TRACE, span_id = %INNER);
            let _r = record.enter();
            tracing::warn!("dead-lettering");
        });
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[0].get("trace_id").is_none() && lines[0].get("span_id").is_none(),
            "{}",
            lines[0]
        );
        assert_eq!(lines[0]["fields"]["message"], "outside");
        assert_eq!(lines[1]["trace_id"], TRACE);
        assert_eq!(lines[1]["span_id"], SPAN);
        assert_eq!(lines[1]["fields"]["message"], "retrying");
        assert_eq!(lines[1]["fields"]["attempt"], 2);
        assert_eq!(lines[2]["trace_id"], TRACE);
        assert_eq!(lines[2]["span_id"], INNER, "the innermost span's id");
    }

    #[test]
    fn ids_that_are_empty_or_not_hex_are_left_out_and_the_line_stays_valid_json() {
        let lines = lines(|| {
            let none = tracing::info_span!("delivery", trace_id = "", span_id = "");
            none.in_scope(|| tracing::info!("no trace"));
            let bad =
                tracing::info_span!("delivery", trace_id = "\"},{\"x\":\"4bf92f3577b34da6a3ce929d0e", span_id = %SPAN);
            bad.in_scope(|| tracing::info!("hostile"));
        });
        assert_eq!(lines.len(), 2, "{lines:?}");
        for line in &lines {
            assert!(
                line.get("trace_id").is_none() && line.get("span_id").is_none(),
                "{line}"
            );
            assert!(line.get("x").is_none(), "{line}");
        }
    }
}
