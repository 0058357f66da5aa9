//! HTTP delivery to the app: builds requests, sends them over a pooled keep-alive client,
//! and reports what the transport saw. It never decides what an answer means (see `retry`).
//!
//! Wire contract (also in the README):
//! - single mode: `POST app.url`, body = record value, metadata in `X-Kafka-*` headers;
//! - batch mode: `POST app.url`, JSON envelope `{"records": [...]}`; the app may answer
//!   `{"results": [{"status": 200}, ...]}` (same order) to settle records one by one.

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use serde::{Deserialize, Serialize};

use crate::config::{AppConfig, DeliveryMode};
use crate::record::Record;
use crate::retry::{parse_retry_after, Transport};

mod envelope;

/// Headers of the single-mode request.
pub mod headers {
    pub const TOPIC: &str = "x-kafka-topic";
    pub const PARTITION: &str = "x-kafka-partition";
    pub const OFFSET: &str = "x-kafka-offset";
    pub const TIMESTAMP: &str = "x-kafka-timestamp";
    pub const KEY: &str = "x-kafka-key";
    pub const VALUE_NULL: &str = "x-kafka-value-null";
    pub const HEADERS: &str = "x-kafka-headers";
    pub const ATTEMPT: &str = "x-kafka-attempt";
    pub const GROUP: &str = "x-kafka-consumer-group";
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
}

/// Record headers passed to the app as plain HTTP headers too (trace context).
const PASSTHROUGH: [&str; 2] = ["traceparent", "tracestate"];

/// A record to send, with the trace context of its delivery span.
pub struct Outgoing<'a> {
    pub record: &'a Record,
    /// `traceparent`/`tracestate` to send instead of the record's own (empty: use the record's).
    pub trace: &'a HashMap<String, String>,
    /// The record's idempotency key (`dedup.key`), sent as `Idempotency-Key`.
    pub idempotency_key: &'a str,
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
    client: reqwest::Client,
    url: reqwest::Url,
    mode: DeliveryMode,
    group: String,
    /// `group` as a header value, built once (None if it is not a valid header value).
    group_header: Option<HeaderValue>,
}

/// One record header in the JSON encodings: the value is base64, or null.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JsonHeader {
    pub name: String,
    pub value: Option<String>,
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
        let mut default_headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            default_headers.insert(HeaderName::from_bytes(name.as_bytes())?, HeaderValue::from_str(value)?);
        }
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .default_headers(default_headers)
            .build()?;
        Ok(Self {
            client,
            url: cfg.url.parse()?,
            mode: cfg.mode,
            group: group.to_string(),
            group_header: HeaderValue::from_str(group).ok(),
        })
    }

    /// Sends records (exactly one in single mode) as attempt number `attempt`.
    pub async fn send(&self, records: &[Outgoing<'_>], attempt: u32) -> Reply {
        let request = match self.mode {
            DeliveryMode::Single => self.single_request(&records[0], attempt),
            DeliveryMode::Batch => self.batch_request(records, attempt),
        };
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                return Reply {
                    transport: transport_error(&e),
                    per_record: None,
                }
            }
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Read the body to the end so the connection goes back to the pool.
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return Reply {
                    transport: transport_error(&e),
                    per_record: None,
                }
            }
        };
        let per_record = match self.mode {
            DeliveryMode::Batch if (200..300).contains(&status) => parse_results(&body, records.len()),
            _ => None,
        };
        Reply {
            transport: Transport::Status { status, retry_after },
            per_record,
        }
    }

    /// Readiness gate: polls `url` until it answers 2xx. False if `stop` fires first.
    pub async fn wait_healthy(&self, url: &str, stop: &tokio_util::sync::CancellationToken) -> bool {
        let mut backoff = crate::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        for n in 0u64.. {
            let status = self.client.get(url).send().await.map(|r| r.status());
            match status {
                Ok(s) if s.is_success() => {
                    tracing::info!(url = %crate::config::redact::url(url), "app is healthy; joining the consumer group");
                    return true;
                }
                other if n % 10 == 0 => {
                    let why = other.map_or_else(|e| error_chain(&e), |s| format!("status {s}"));
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

    fn single_request(&self, out: &Outgoing<'_>, attempt: u32) -> reqwest::RequestBuilder {
        let r = out.record;
        // Numbers and the group go in without a String in between: this runs once per record.
        let mut h = HeaderMap::with_capacity(16);
        if let Ok(v) = HeaderValue::from_str(&r.topic) {
            h.insert(headers::TOPIC, v);
        }
        h.insert(headers::PARTITION, HeaderValue::from(r.partition));
        h.insert(headers::OFFSET, HeaderValue::from(r.offset));
        h.insert(headers::ATTEMPT, HeaderValue::from(attempt));
        if let Some(group) = &self.group_header {
            h.insert(headers::GROUP, group.clone());
        }
        if let Some(ts) = r.timestamp_ms {
            h.insert(headers::TIMESTAMP, HeaderValue::from(ts));
        }
        let mut put = |name: &'static str, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        };
        put(headers::IDEMPOTENCY_KEY, out.idempotency_key);
        if let Some(key) = &r.key {
            put(headers::KEY, &B64.encode(key));
        }
        if r.value.is_none() {
            put(headers::VALUE_NULL, "true");
        }
        if !r.headers.is_empty() {
            put(headers::HEADERS, &ascii_json(&json_headers(r)));
        }
        for name in PASSTHROUGH {
            if let Some(v) = out.trace.get(name).map(String::as_str).or_else(|| r.header_str(name)) {
                put(name, v);
            }
        }
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let body = r.value.clone().unwrap_or_default();
        self.client.post(self.url.clone()).headers(h).body(body)
    }

    fn batch_request(&self, records: &[Outgoing<'_>], attempt: u32) -> reqwest::RequestBuilder {
        self.client
            .post(self.url.clone())
            .header(headers::GROUP, &self.group)
            .header(headers::ATTEMPT, attempt.to_string())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(envelope::batch_body(records, attempt))
    }
}

fn transport_error(e: &reqwest::Error) -> Transport {
    if e.is_connect() {
        Transport::Unreachable(error_text(e))
    } else if e.is_timeout() {
        Transport::Timeout
    } else {
        Transport::Failed(error_text(e))
    }
}

/// The error chain with the URL's credentials redacted: the text goes to logs and into
/// `x-dlq-error` of dead-lettered records.
fn error_text(e: &reqwest::Error) -> String {
    let msg = error_chain(e);
    match e.url() {
        Some(u) => msg.replace(u.as_str(), &crate::config::redact::url(u.as_str())),
        None => msg,
    }
}

/// reqwest's top-level message hides the cause ("error sending request"); keep the chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

fn parse_results(body: &[u8], expected: usize) -> Option<Vec<u16>> {
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
        .map(|(name, value)| JsonHeader {
            name: name.clone(),
            value: value.as_ref().map(|v| B64.encode(v)),
        })
        .collect()
}

/// JSON with every non-ASCII character escaped, so it is a valid HTTP header value.
fn ascii_json<T: Serialize>(v: &T) -> String {
    let json = serde_json::to_string(v).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
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
mod tests {
    use super::*;

    #[test]
    fn header_json_is_ascii_and_round_trips() {
        let hs = vec![
            JsonHeader {
                name: "héader".into(),
                value: Some(B64.encode([0u8, 255])),
            },
            JsonHeader {
                name: "empty".into(),
                value: None,
            },
        ];
        let s = ascii_json(&hs);
        assert!(s.is_ascii(), "{s}");
        let back: Vec<JsonHeader> = serde_json::from_str(&s).unwrap();
        assert_eq!(back, hs);
    }

    #[test]
    fn batch_results_must_match_the_record_count() {
        assert_eq!(
            parse_results(br#"{"results":[{"status":200},{"status":422}]}"#, 2),
            Some(vec![200, 422])
        );
        assert_eq!(parse_results(br#"{"results":[{"status":200}]}"#, 2), None);
        assert_eq!(parse_results(b"ok", 2), None);
    }
}
