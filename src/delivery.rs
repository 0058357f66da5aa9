//! HTTP delivery to the app: builds requests, sends them over a pooled keep-alive client,
//! and reports what the transport saw. It never decides what an answer means (see `retry`).
//!
//! Wire contract (also in the README):
//! - single mode: `POST app.url`, body = record value, metadata in `X-Kafka-*` headers;
//! - batch mode: `POST app.url`, JSON envelope `{"records": [...]}`; the app may answer
//!   `{"results": [{"status": 200}, ...]}` (same order) to settle records one by one.
//!
//! Every record travels losslessly: keys, values and header values as base64, header names
//! as JSON strings when they are UTF-8 and as `name_base64` when they are not. In single
//! mode a record whose metadata headers would exceed `app.max_header_bytes` is not sent at
//! all ([`AppClient::refusal`]): proxies and servers reject large headers (nginx answers 431
//! above 8 KiB), and retrying could never help.

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Method, Request};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use crate::config::{AppConfig, AppTarget, DeliveryMode};
use crate::record::Record;
use crate::retry::{ErrorInfo, Transport};
use crate::retry_topics::RetryInfo;

mod client;
mod envelope;

pub use self::client::MAX_RESPONSE_BYTES;
use self::client::{Endpoint, Http};

/// Headers of the single-mode request, as `HeaderName`s built at compile time: a `&str`
/// name is parsed and checked on every insert, a dozen times per single-mode request.
pub mod headers {
    use http::header::HeaderName;

    pub const TOPIC: HeaderName = HeaderName::from_static("x-kafka-topic");
    pub const PARTITION: HeaderName = HeaderName::from_static("x-kafka-partition");
    pub const OFFSET: HeaderName = HeaderName::from_static("x-kafka-offset");
    pub const TIMESTAMP: HeaderName = HeaderName::from_static("x-kafka-timestamp");
    pub const KEY: HeaderName = HeaderName::from_static("x-kafka-key");
    pub const VALUE_NULL: HeaderName = HeaderName::from_static("x-kafka-value-null");
    pub const HEADERS: HeaderName = HeaderName::from_static("x-kafka-headers");
    pub const ATTEMPT: HeaderName = HeaderName::from_static("x-kafka-attempt");
    pub const GROUP: HeaderName = HeaderName::from_static("x-kafka-consumer-group");
    pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
    /// Single mode, a record read from a retry tier: the tier (1 for the first) and where
    /// the record was first read.
    pub const RETRY_TIER: HeaderName = HeaderName::from_static("x-kafka-retry-tier");
    pub const ORIGINAL_TOPIC: HeaderName = HeaderName::from_static("x-kafka-original-topic");
    pub const ORIGINAL_PARTITION: HeaderName = HeaderName::from_static("x-kafka-original-partition");
    pub const ORIGINAL_OFFSET: HeaderName = HeaderName::from_static("x-kafka-original-offset");
}

/// Record headers passed to the app as plain HTTP headers too (trace context).
const PASSTHROUGH: [(&str, HeaderName); 2] = [
    ("traceparent", HeaderName::from_static("traceparent")),
    ("tracestate", HeaderName::from_static("tracestate")),
];

/// A record to send, with the trace context of its delivery span.
pub struct Outgoing<'a> {
    pub record: &'a Record,
    /// `traceparent`/`tracestate` to send instead of the record's own (empty: use the record's).
    pub trace: &'a HashMap<String, String>,
    /// The record's idempotency key (`dedup.key`), sent as `Idempotency-Key`.
    pub idempotency_key: &'a str,
    /// For a record read from a retry tier: its earlier attempts and original coordinates.
    pub retry: Option<&'a RetryInfo>,
}

/// What one request produced: the transport outcome and, for a batch answered with a
/// `results` array, one status per record.
#[derive(Debug, Clone)]
pub struct Reply {
    pub transport: Transport,
    pub per_record: Option<Vec<u16>>,
}

/// The app as seen from the sidecar.
#[derive(Debug, Clone)]
pub struct AppClient {
    http: Http,
    endpoint: Endpoint,
    mode: DeliveryMode,
    /// The consumer group as a header value, built once (None if it is not a valid header
    /// value: the header is then left out rather than failing every request).
    group_header: Option<HeaderValue>,
    /// `app.max_header_bytes`: the most bytes of per-record metadata headers in single mode.
    max_header_bytes: usize,
}

/// Error class of a record whose single-mode metadata headers exceed `app.max_header_bytes`.
pub const HEADERS_TOO_LARGE: &str = "headers_too_large";

/// One record header in the JSON encodings (`X-Kafka-Headers`, the batch envelope).
///
/// The name is in `name` when it is valid UTF-8, else in `name_base64` (base64 of its
/// bytes); exactly one of the two is present. The value is base64, or null.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JsonHeader {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub name_base64: Option<String>,
    pub value: Option<String>,
}

impl JsonHeader {
    /// The JSON form of one record header.
    pub fn new(name: &[u8], value: Option<&[u8]>) -> Self {
        let (name, name_base64) = match std::str::from_utf8(name) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (None, Some(B64.encode(name))),
        };
        Self {
            name,
            name_base64,
            value: value.map(|v| B64.encode(v)),
        }
    }

    /// The header's name and value as bytes; `None` if the JSON is not a valid header
    /// (no name or both forms, or base64 that does not decode).
    pub fn decode(&self) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        let name = match (&self.name, &self.name_base64) {
            (Some(name), None) => name.as_bytes().to_vec(),
            (None, Some(b64)) => B64.decode(b64).ok()?,
            _ => return None,
        };
        let value = match &self.value {
            Some(v) => Some(B64.decode(v).ok()?),
            None => None,
        };
        Some((name, value))
    }
}

/// One record in the batch envelope.
#[derive(Debug, Serialize, Deserialize)]
pub struct JsonRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp: Option<i64>,
    /// base64, or null for a record without key.
    pub key: Option<String>,
    /// base64, or null for a tombstone.
    pub value: Option<String>,
    pub headers: Vec<JsonHeader>,
    pub attempt: u32,
    /// W3C trace context of this record's delivery span (or the record's own), if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub traceparent: Option<String>,
    /// The record's idempotency key (`dedup.key`), as in the `Idempotency-Key` header of single mode.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub idempotency_key: Option<String>,
}

/// The batch request body.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchEnvelope {
    pub records: Vec<JsonRecord>,
}

#[derive(Debug, Deserialize)]
struct BatchResults {
    results: Vec<BatchResult>,
}

#[derive(Debug, Deserialize)]
struct BatchResult {
    status: u16,
}

impl AppClient {
    pub fn new(cfg: &AppConfig, group: &str) -> anyhow::Result<Self> {
        let group_header = HeaderValue::from_str(group).ok();
        if group_header.is_none() {
            tracing::warn!(
                "the consumer group name is not a valid HTTP header value (it has non-ASCII or \
                 control characters); requests are sent without X-Kafka-Consumer-Group"
            );
        }
        let mut default_headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            default_headers.insert(HeaderName::from_bytes(name.as_bytes())?, HeaderValue::from_str(value)?);
        }
        let target = AppTarget::parse(&cfg.url).map_err(|e| anyhow::anyhow!("app.url {e}"))?;
        let endpoint = Endpoint::parse(&cfg.url).map_err(|e| anyhow::anyhow!("app.url {e}"))?;
        // Over a socket every connection goes to it; the URL then only gives the path and Host.
        let http = Http::new(target.socket(), default_headers, cfg.timeout, cfg.connect_timeout)?;
        Ok(Self {
            http,
            endpoint,
            mode: cfg.mode,
            group_header,
            max_header_bytes: usize::try_from(cfg.max_header_bytes.as_u64()).unwrap_or(usize::MAX),
        })
    }

    /// Sends records (exactly one in single mode) as attempt number `attempt`.
    pub async fn send(&self, records: &[Outgoing<'_>], attempt: u32) -> Reply {
        let request = match self.mode {
            DeliveryMode::Single => self.single_request(&records[0], attempt),
            DeliveryMode::Batch => self.batch_request(records, attempt),
        };
        let (transport, body) = self.http.exchange(request).await;
        let per_record = match (self.mode, &transport) {
            (DeliveryMode::Batch, Transport::Status { status, .. }) if (200..300).contains(status) => {
                parse_results(&body, records.len())
            }
            _ => None,
        };
        Reply { transport, per_record }
    }

    /// Readiness gate: polls `url` (`app.health_url`, on the same transport as `app.url`)
    /// until it answers 2xx. False if `stop` fires first.
    pub async fn wait_healthy(&self, url: &str, stop: &tokio_util::sync::CancellationToken) -> bool {
        let mut backoff = crate::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        // Checked by config validation; a URL that still fails is reported as the answer.
        let endpoint = Endpoint::parse(url).map_err(|e| format!("app.health_url {e}"));
        for n in 0u64.. {
            let status = match &endpoint {
                Ok(endpoint) => {
                    let request = self.http.request(Method::GET, endpoint, HeaderMap::new(), Bytes::new());
                    match self.http.exchange(request).await.0 {
                        Transport::Status { status, .. } => Ok(status),
                        Transport::Timeout => Err("timed out".to_string()),
                        Transport::Unreachable(e) | Transport::Failed(e) => Err(e),
                    }
                }
                Err(e) => Err(e.clone()),
            };
            match status {
                Ok(s) if (200..300).contains(&s) => {
                    tracing::info!(url = %crate::config::redact::url(url), "app is healthy; joining the consumer group");
                    return true;
                }
                other if n % 10 == 0 => {
                    let why = other.map_or_else(|e| e, |s| format!("status {s}"));
                    tracing::info!(url = %crate::config::redact::url(url), answer = %why, "waiting for the app to be healthy before joining the consumer group");
                }
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay().max(Duration::from_millis(100))) => {}
                _ = stop.cancelled() => return false,
            }
        }
        false
    }

    /// Why these records cannot be sent at all, if so: in single mode, metadata headers
    /// over `app.max_header_bytes` (class [`HEADERS_TOO_LARGE`]). Batch mode carries all
    /// metadata in the body, so it never refuses.
    pub fn refusal(&self, records: &[Outgoing<'_>]) -> Option<ErrorInfo> {
        if self.mode != DeliveryMode::Single {
            return None;
        }
        let out = records.first()?;
        if self.single_headers_bound(out) <= self.max_header_bytes {
            return None;
        }
        // Measured with the longest attempt number, so retries cannot change the decision.
        let size = header_bytes(&self.single_headers(out, u32::MAX));
        (size > self.max_header_bytes).then(|| {
            ErrorInfo::new(
                HEADERS_TOO_LARGE,
                format!(
                    "the record's metadata headers (X-Kafka-Key, X-Kafka-Headers, ...) take {size} bytes, \
                     over app.max_header_bytes ({}); use app.mode = \"batch\" (metadata in the body) \
                     or raise the limit if the app and every proxy before it accept larger headers",
                    self.max_header_bytes
                ),
            )
        })
    }

    /// At least the [`header_bytes`] of [`Self::single_headers`], without building them:
    /// almost every record is far below the limit and is then built only once.
    fn single_headers_bound(&self, out: &Outgoing<'_>) -> usize {
        // Header names, separators, numbers (at most 20 digits each) and the content type.
        const FIXED: usize = 512;
        let r = out.record;
        let b64 = |n: usize| n.div_ceil(3) * 4;
        let key = r.key.as_ref().map_or(0, |k| b64(k.len()));
        // JSON escaping at most sextuples a name (`\u00XX` per byte), base64 is less; a
        // header's punctuation and field names take under 40 bytes.
        let json: usize = r
            .headers
            .iter()
            .map(|(name, value)| 6 * name.len() + value.as_ref().map_or(4, |v| b64(v.len())) + 40)
            .sum();
        let trace: usize = PASSTHROUGH
            .iter()
            .map(|(name, _)| {
                let span = out.trace.get(*name).map_or(0, String::len);
                span.max(r.header_str(name).map_or(0, str::len))
            })
            .sum();
        let group = self.group_header.as_ref().map_or(0, HeaderValue::len);
        // A retry tier's headers: names, numbers and the original topic.
        let retry = out.retry.map_or(0, |info| info.origin.topic.len() + 160);
        FIXED + r.topic.len() + group + out.idempotency_key.len() + key + 2 + json + trace + retry
    }

    fn single_request(&self, out: &Outgoing<'_>, attempt: u32) -> Request<Full<Bytes>> {
        let h = self.single_headers(out, attempt);
        let body = out.record.value.clone().unwrap_or_default();
        self.http.request(Method::POST, &self.endpoint, h, body)
    }

    /// The headers of a single-mode request (`app.headers` are added by the client).
    pub fn single_headers(&self, out: &Outgoing<'_>, attempt: u32) -> HeaderMap {
        let r = out.record;
        // Numbers and the group go in without a String in between: this runs once per record.
        let mut h = HeaderMap::with_capacity(16);
        if let Ok(v) = HeaderValue::from_str(&r.topic) {
            h.insert(headers::TOPIC, v);
        }
        h.insert(headers::PARTITION, HeaderValue::from(r.partition));
        h.insert(headers::OFFSET, HeaderValue::from(r.offset));
        // A record from a retry tier continues its count of attempts.
        let prior = out.retry.map_or(0, |info| info.prior_attempts);
        h.insert(headers::ATTEMPT, HeaderValue::from(attempt.saturating_add(prior)));
        if let Some(info) = out.retry {
            h.insert(headers::RETRY_TIER, HeaderValue::from(info.tier + 1));
            h.insert(headers::ORIGINAL_PARTITION, HeaderValue::from(info.origin.partition));
            h.insert(headers::ORIGINAL_OFFSET, HeaderValue::from(info.origin.offset));
        }
        if let Some(group) = &self.group_header {
            h.insert(headers::GROUP, group.clone());
        }
        if let Some(ts) = r.timestamp_ms {
            h.insert(headers::TIMESTAMP, HeaderValue::from(ts));
        }
        // Only visible ASCII: `http` also accepts bytes 0x80-0xff (obs-text), which many
        // servers reject. Every value below is ASCII by construction except a trace context
        // copied from the record, which is then left out (X-Kafka-Headers still carries it).
        let mut put = |name: HeaderName, value: &str| {
            if let Some(v) = HeaderValue::from_str(value).ok().filter(|v| v.to_str().is_ok()) {
                h.insert(name, v);
            }
        };
        put(headers::IDEMPOTENCY_KEY, out.idempotency_key);
        if let Some(info) = out.retry {
            put(headers::ORIGINAL_TOPIC, &info.origin.topic);
        }
        if let Some(key) = &r.key {
            put(headers::KEY, &B64.encode(key));
        }
        if r.value.is_none() {
            put(headers::VALUE_NULL, "true");
        }
        if !r.headers.is_empty() {
            put(headers::HEADERS, &ascii_json(&json_headers(r)));
        }
        for (name, header) in PASSTHROUGH {
            if let Some(v) = out.trace.get(name).map(String::as_str).or_else(|| r.header_str(name)) {
                put(header, v);
            }
        }
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h
    }

    fn batch_request(&self, records: &[Outgoing<'_>], attempt: u32) -> Request<Full<Bytes>> {
        let mut h = HeaderMap::with_capacity(3);
        if let Some(group) = &self.group_header {
            h.insert(headers::GROUP, group.clone());
        }
        h.insert(headers::ATTEMPT, HeaderValue::from(attempt));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let body = envelope::batch_body(records, attempt);
        self.http.request(Method::POST, &self.endpoint, h, body.into())
    }
}

/// Size of headers as sent in HTTP/1.1: `name: value\r\n` each.
fn header_bytes(h: &HeaderMap) -> usize {
    h.iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// The per-record statuses of a batch answer; `None` for anything but a `results` array of
/// the right length (then the HTTP status applies to every record). Total on any bytes.
pub fn parse_results(body: &[u8], expected: usize) -> Option<Vec<u16>> {
    let parsed: BatchResults = serde_json::from_slice(body).ok()?;
    if parsed.results.len() != expected {
        tracing::warn!(
            got = parsed.results.len(),
            expected,
            "batch response has a results array of the wrong length; applying the response status to all records"
        );
        return None;
    }
    Some(parsed.results.into_iter().map(|r| r.status).collect())
}

/// The record's headers in the JSON form used by `X-Kafka-Headers` and the batch envelope.
pub fn json_headers(r: &Record) -> Vec<JsonHeader> {
    r.headers
        .iter()
        .map(|(name, value)| JsonHeader::new(name, value.as_deref()))
        .collect()
}

/// JSON with every character that is not visible ASCII escaped (non-ASCII and DEL; serde_json
/// already escapes control characters), so it is a valid HTTP header value.
fn ascii_json<T: Serialize>(v: &T) -> String {
    let json = serde_json::to_string(v).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() && c != '\u{7f}' {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod properties;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn client(mode: DeliveryMode, group: &str) -> AppClient {
        let cfg = AppConfig {
            url: "http://127.0.0.1:9/records".into(),
            mode,
            ..AppConfig::default()
        };
        AppClient::new(&cfg, group).unwrap()
    }

    fn record(key: Option<Vec<u8>>, headers: Vec<(Bytes, Option<Bytes>)>) -> Record {
        Record {
            topic: Arc::from("orders"),
            partition: 1,
            offset: 7,
            timestamp_ms: None,
            key: key.map(Bytes::from),
            value: Some(Bytes::from_static(b"v")),
            headers,
            generation: 1,
        }
    }

    fn outgoing<'a>(r: &'a Record, trace: &'a HashMap<String, String>) -> Outgoing<'a> {
        Outgoing {
            record: r,
            trace,
            idempotency_key: "orders/1/7",
            retry: None,
        }
    }

    #[test]
    fn header_json_is_ascii_and_round_trips() {
        let hs = vec![
            JsonHeader::new("héader".as_bytes(), Some(&[0, 255])),
            JsonHeader::new(b"empty", None),
            JsonHeader::new(b"del\x7f\r\n", Some(b"")),
            JsonHeader::new(b"\xff\xfe", Some(b"v")),
        ];
        let s = ascii_json(&hs);
        assert!(HeaderValue::from_str(&s).is_ok(), "not a valid header value: {s}");
        let back: Vec<JsonHeader> = serde_json::from_str(&s).unwrap();
        assert_eq!(back, hs);
    }

    #[test]
    fn a_header_name_that_is_not_utf8_travels_as_name_base64() {
        let h = JsonHeader::new(b"\xff\xfe", Some(b"v"));
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            r#"{"name_base64":"//4=","value":"dg=="}"#
        );
        assert_eq!(h.decode(), Some((vec![0xff, 0xfe], Some(b"v".to_vec()))));
        let utf8 = JsonHeader::new(b"h", None);
        assert_eq!(serde_json::to_string(&utf8).unwrap(), r#"{"name":"h","value":null}"#);
        for bad in [
            r#"{"value":null}"#,
            r#"{"name":"h","name_base64":"aA==","value":null}"#,
            r#"{"name_base64":"not base64!","value":null}"#,
            r#"{"name":"h","value":"not base64!"}"#,
        ] {
            let h: JsonHeader = serde_json::from_str(bad).unwrap();
            assert_eq!(h.decode(), None, "{bad}");
        }
    }

    #[test]
    fn single_mode_refuses_a_record_whose_metadata_headers_exceed_the_limit() {
        let no_trace = HashMap::new();
        let app = client(DeliveryMode::Single, "g");
        let small = record(Some(vec![b'k'; 100]), vec![]);
        assert!(app.refusal(&[outgoing(&small, &no_trace)]).is_none());
        let big_key = record(Some(vec![b'k'; 10 * 1024]), vec![]);
        let error = app.refusal(&[outgoing(&big_key, &no_trace)]).expect("refused");
        assert_eq!(error.class, HEADERS_TOO_LARGE);
        assert!(
            error.message.contains("app.max_header_bytes (8192)"),
            "{}",
            error.message
        );
        let many_headers: Vec<_> = (0..1000)
            .map(|i| (Bytes::from(format!("h{i}")), Some(Bytes::from_static(b"v"))))
            .collect();
        let many = record(None, many_headers);
        assert!(app.refusal(&[outgoing(&many, &no_trace)]).is_some());
        let batch = client(DeliveryMode::Batch, "g");
        assert!(
            batch.refusal(&[outgoing(&big_key, &no_trace)]).is_none(),
            "batch carries it in the body"
        );
    }

    #[test]
    fn a_group_that_is_not_a_header_value_is_left_out_of_requests_not_an_error() {
        let no_trace = HashMap::new();
        let r = record(Some(b"k".to_vec()), vec![]);
        for mode in [DeliveryMode::Single, DeliveryMode::Batch] {
            let app = client(mode, "grüppe\n");
            let request = match mode {
                DeliveryMode::Single => app.single_request(&outgoing(&r, &no_trace), 1),
                DeliveryMode::Batch => app.batch_request(&[outgoing(&r, &no_trace)], 1),
            };
            assert!(request.headers().get(headers::GROUP).is_none(), "{mode:?}");
            assert_eq!(request.headers()[headers::ATTEMPT], "1");
            let good = client(mode, "orders-app");
            let request = match mode {
                DeliveryMode::Single => good.single_request(&outgoing(&r, &no_trace), 1),
                DeliveryMode::Batch => good.batch_request(&[outgoing(&r, &no_trace)], 1),
            };
            assert_eq!(request.headers()[headers::GROUP], "orders-app");
        }
    }

    #[test]
    fn batch_results_must_match_the_record_count() {
        assert_eq!(
            parse_results(br#"{"results":[{"status":200},{"status":422}]}"#, 2),
            Some(vec![200, 422])
        );
        assert_eq!(parse_results(br#"{"results":[{"status":200}]}"#, 2), None);
        assert_eq!(parse_results(b"ok", 2), None);
        assert_eq!(parse_results(br#"{"results":[{"status":70000}]}"#, 1), None);
    }
}
