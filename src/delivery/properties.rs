//! Property tests of the record encoders and of the decoders of app answers.
//!
//! Records of arbitrary bytes (header names included) must reach the app losslessly in
//! both modes, as valid HTTP; arbitrary answers must never make the sidecar panic. Case
//! counts are bounded for CI (`PROPTEST_CASES` overrides them; BENCHMARKS.md has a long run).

use std::collections::HashMap;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::Value;

use super::envelope::batch_body;
use super::*;
use crate::dedup::{derive_key, KeySource};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES: u32 = 512;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(CASES),
        ..ProptestConfig::default()
    }
}

/// Bytes biased towards what breaks encoders: empty, NUL, control characters, DEL, invalid
/// UTF-8, multi-byte UTF-8, quotes and backslashes.
fn nasty_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(vec![0u8, b'"', b'\\', b'\r', b'\n', 0x7f, 0xff, 0xfe, 0xc3, 0xa9]),
    ];
    let text = ".{0,8}".prop_map(String::into_bytes);
    prop::collection::vec(prop_oneof![prop::collection::vec(byte, 0..8), text], 0..=max / 8)
        .prop_map(|chunks| chunks.concat())
}

fn header() -> impl Strategy<Value = (Bytes, Option<Bytes>)> {
    (
        nasty_bytes(24).prop_map(Bytes::from),
        prop::option::of(nasty_bytes(64).prop_map(Bytes::from)),
    )
}

fn record() -> impl Strategy<Value = Record> {
    (
        "[a-zA-Z0-9._-]{1,40}",
        any::<i32>(),
        any::<i64>(),
        prop::option::of(any::<i64>()),
        prop::option::of(nasty_bytes(64).prop_map(Bytes::from)),
        prop::option::of(nasty_bytes(256).prop_map(Bytes::from)),
        prop::collection::vec(header(), 0..12),
    )
        .prop_map(|(topic, partition, offset, timestamp_ms, key, value, headers)| Record {
            topic: Arc::from(topic.as_str()),
            partition,
            offset,
            timestamp_ms,
            key,
            value,
            headers,
            generation: 1,
        })
}

fn key_source() -> impl Strategy<Value = KeySource> {
    prop_oneof![
        Just(KeySource::Offset),
        Just(KeySource::Key),
        Just(KeySource::ValueHash),
        ".{1,12}".prop_map(KeySource::Header),
    ]
}

/// A traceparent the sidecar would pass on: the delivery span's, or none (then the record's own).
fn trace() -> impl Strategy<Value = HashMap<String, String>> {
    prop::option::of(".{0,60}").prop_map(|tp| tp.into_iter().map(|tp| ("traceparent".to_string(), tp)).collect())
}

/// The single-mode client, built once (building one per case is slow).
fn single_client() -> &'static AppClient {
    static CLIENT: std::sync::OnceLock<AppClient> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let cfg = AppConfig {
            url: "http://127.0.0.1:9/records".into(),
            mode: DeliveryMode::Single,
            ..AppConfig::default()
        };
        AppClient::new(&cfg, "group").expect("client")
    })
}

/// Decodes `[{"name"|"name_base64": ..., "value": ...}]` with nothing but serde_json and
/// base64, independently of [`JsonHeader`], as an app would.
fn decode_headers(json: &Value) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let b64 = |v: &Value| B64.decode(v.as_str().expect("a base64 string")).expect("valid base64");
    json.as_array()
        .expect("headers are an array")
        .iter()
        .map(|h| {
            let name = match (h.get("name"), h.get("name_base64")) {
                (Some(name), None) => name.as_str().expect("name is a string").as_bytes().to_vec(),
                (None, Some(b)) => b64(b),
                other => panic!("exactly one of name and name_base64 must be present: {other:?}"),
            };
            let value = match &h["value"] {
                Value::Null => None,
                v => Some(b64(v)),
            };
            (name, value)
        })
        .collect()
}

fn raw_headers(r: &Record) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    r.headers
        .iter()
        .map(|(n, v)| (n.to_vec(), v.as_ref().map(|v| v.to_vec())))
        .collect()
}

proptest! {
    #![proptest_config(config())]

    /// Single mode: every header is valid HTTP (visible ASCII), and the key, the null-value
    /// flag and the record headers decode back to the record's exact bytes.
    #[test]
    fn single_mode_headers_are_valid_http_and_decode_to_the_same_bytes(
        r in record(), source in key_source(), trace in trace(), attempt in 1u32..100,
    ) {
        let key = derive_key(&source, &r).key;
        let out = Outgoing { record: &r, trace: &trace, idempotency_key: &key, retry: None };
        let h = single_client().single_headers(&out, attempt);
        for (name, value) in &h {
            prop_assert!(value.to_str().is_ok(), "{name} is not visible ASCII: {value:?}");
        }
        let get = |name: http::header::HeaderName| h.get(name).map(|v| v.to_str().unwrap_or_default().to_string());
        prop_assert_eq!(get(headers::TOPIC), Some(r.topic.to_string()));
        prop_assert_eq!(get(headers::PARTITION), Some(r.partition.to_string()));
        prop_assert_eq!(get(headers::OFFSET), Some(r.offset.to_string()));
        prop_assert_eq!(get(headers::ATTEMPT), Some(attempt.to_string()));
        prop_assert_eq!(get(headers::TIMESTAMP), r.timestamp_ms.map(|t| t.to_string()));
        prop_assert_eq!(get(headers::IDEMPOTENCY_KEY), Some(key.clone()));
        let sent_key = get(headers::KEY).map(|k| B64.decode(k).expect("key is base64"));
        prop_assert_eq!(sent_key, r.key.as_ref().map(|k| k.to_vec()));
        prop_assert_eq!(get(headers::VALUE_NULL).is_some(), r.value.is_none());
        match get(headers::HEADERS) {
            None => prop_assert!(r.headers.is_empty()),
            Some(json) => {
                let json: Value = serde_json::from_str(&json).expect("X-Kafka-Headers is JSON");
                prop_assert_eq!(decode_headers(&json), raw_headers(&r));
            }
        }
    }

    /// The cheap size bound that spares most records a second build of their headers is
    /// never below the real size (else a record over the limit could be sent).
    #[test]
    fn the_header_size_bound_is_never_below_the_real_size(
        r in record(), source in key_source(), trace in trace(), attempt in any::<u32>(),
    ) {
        let key = derive_key(&source, &r).key;
        let out = Outgoing { record: &r, trace: &trace, idempotency_key: &key, retry: None };
        let client = single_client();
        let real = header_bytes(&client.single_headers(&out, attempt));
        prop_assert!(client.single_headers_bound(&out) >= real, "bound below {real}");
    }

    /// Batch mode: the envelope parses with serde_json (as the documented types and as plain
    /// JSON) and every field decodes back to the record's exact bytes; the hand-written body
    /// is byte for byte what serde_json makes of the documented types.
    #[test]
    fn the_batch_envelope_round_trips_to_the_same_bytes(
        records in prop::collection::vec((record(), trace(), ".{0,40}"), 0..6), attempt in 1u32..100,
    ) {
        let outgoing: Vec<Outgoing<'_>> = records
            .iter()
            .map(|(record, trace, key)| Outgoing { record, trace, idempotency_key: key, retry: None })
            .collect();
        let body = batch_body(&outgoing, attempt);
        let typed: BatchEnvelope = serde_json::from_slice(&body).expect("the envelope parses as BatchEnvelope");
        prop_assert_eq!(serde_json::to_vec(&typed).expect("serializes"), body.clone());
        let json: Value = serde_json::from_slice(&body).expect("the envelope is JSON");
        let sent = json["records"].as_array().expect("records array");
        prop_assert_eq!(sent.len(), records.len());
        for ((r, trace, key), (j, typed)) in records.iter().zip(sent.iter().zip(&typed.records)) {
            let b64 = |v: &Value| v.as_str().map(|s| B64.decode(s).expect("base64"));
            prop_assert_eq!(j["topic"].as_str(), Some(&*r.topic));
            prop_assert_eq!(j["partition"].as_i64(), Some(i64::from(r.partition)));
            prop_assert_eq!(j["offset"].as_i64(), Some(r.offset));
            prop_assert_eq!(j["timestamp"].as_i64(), r.timestamp_ms);
            prop_assert_eq!(b64(&j["key"]), r.key.as_ref().map(|k| k.to_vec()));
            prop_assert_eq!(b64(&j["value"]), r.value.as_ref().map(|v| v.to_vec()));
            prop_assert_eq!(decode_headers(&j["headers"]), raw_headers(r));
            let typed_headers: Vec<_> = typed.headers.iter().map(|h| h.decode().expect("decodes")).collect();
            prop_assert_eq!(typed_headers, raw_headers(r));
            prop_assert_eq!(j["attempt"].as_u64(), Some(u64::from(attempt)));
            prop_assert_eq!(j["idempotency_key"].as_str(), Some(key.as_str()));
            let expected_tp = trace.get("traceparent").map(String::as_str).or_else(|| r.header_str("traceparent"));
            prop_assert_eq!(j.get("traceparent").and_then(Value::as_str), expected_tp);
        }
    }

    /// Any bytes as a batch answer: no panic; per-record statuses only for a results array
    /// of the right length.
    #[test]
    fn batch_answers_of_any_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..256), n in 0usize..8) {
        if let Some(statuses) = parse_results(&body, n) {
            prop_assert_eq!(statuses.len(), n);
        }
    }

    /// JSON-shaped answers (the likelier mistakes: wrong types, lengths, extra fields).
    #[test]
    fn batch_answers_shaped_like_json_never_panic(
        statuses in prop::collection::vec(prop_oneof![
            any::<u16>().prop_map(|s| s.to_string()),
            any::<i64>().prop_map(|s| s.to_string()),
            Just("null".to_string()), Just("\"200\"".to_string()), Just("2e2".to_string()),
            ".{0,6}",
        ], 0..6),
        n in 0usize..8,
        tail in ".{0,6}",
    ) {
        let items: Vec<String> = statuses.iter().map(|s| format!("{{\"status\":{s}}}")).collect();
        let body = format!("{{\"results\":[{}]{tail}}}", items.join(","));
        let parsed = parse_results(body.as_bytes(), n);
        // Statuses written exactly as a u16 prints (no sign, no leading zero) must come back.
        let exact: Option<Vec<u16>> = statuses
            .iter()
            .map(|s| s.parse::<u16>().ok().filter(|v| v.to_string() == *s))
            .collect();
        if tail.is_empty() && statuses.len() == n {
            if let Some(exact) = exact {
                prop_assert_eq!(parsed, Some(exact));
            }
        }
    }
}
