//! The batch request body, written straight into one buffer.
//!
//! Byte for byte what serializing [`BatchEnvelope`](super::BatchEnvelope) gives, without
//! building it first: no intermediate strings per record, and base64 (JSON-safe by
//! construction) is written as is instead of being scanned for characters to escape. Other
//! strings (topic, header names, traceparent) are escaped by serde_json. A header name that
//! is not UTF-8 is written as `name_base64`, like [`JsonHeader::new`](super::JsonHeader::new).

use base64_simd::STANDARD as SIMD_B64;

use super::Outgoing;

/// `{"records":[...]}` for these records, sent as attempt number `attempt`.
pub(super) fn batch_body(records: &[Outgoing<'_>], attempt: u32) -> Vec<u8> {
    // Base64 is 4/3 of the data; the metadata of a record takes about 150 bytes.
    let estimate: usize = records.iter().map(|o| o.record.size() * 4 / 3 + 160).sum();
    let mut out = Vec::with_capacity(estimate + 16);
    out.extend_from_slice(b"{\"records\":[");
    let mut numbers = itoa::Buffer::new();
    for (
        i,
        Outgoing {
            record: r,
            trace,
            idempotency_key,
            retry,
        },
    ) in records.iter().enumerate()
    {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"topic\":");
        json_str(&mut out, &r.topic);
        // Numbers with itoa, not `write!`: core::fmt per record was ~1.5 % of batch mode.
        out.extend_from_slice(b",\"partition\":");
        out.extend_from_slice(numbers.format(r.partition).as_bytes());
        out.extend_from_slice(b",\"offset\":");
        out.extend_from_slice(numbers.format(r.offset).as_bytes());
        out.extend_from_slice(b",\"timestamp\":");
        match r.timestamp_ms {
            Some(ts) => out.extend_from_slice(numbers.format(ts).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"key\":");
        base64_or_null(&mut out, r.key.as_deref());
        out.extend_from_slice(b",\"value\":");
        base64_or_null(&mut out, r.value.as_deref());
        out.extend_from_slice(b",\"headers\":[");
        for (j, (name, value)) in r.headers.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            match std::str::from_utf8(name) {
                Ok(name) => {
                    out.extend_from_slice(b"{\"name\":");
                    json_str(&mut out, name);
                }
                Err(_) => {
                    out.extend_from_slice(b"{\"name_base64\":");
                    base64_or_null(&mut out, Some(name));
                }
            }
            out.extend_from_slice(b",\"value\":");
            base64_or_null(&mut out, value.as_deref());
            out.push(b'}');
        }
        // A record from a retry tier continues its count.
        let prior = retry.map_or(0, |r| r.prior_attempts);
        out.extend_from_slice(b"],\"attempt\":");
        out.extend_from_slice(numbers.format(attempt.saturating_add(prior)).as_bytes());
        let traceparent = trace
            .get("traceparent")
            .map(String::as_str)
            .or_else(|| r.header_str("traceparent"));
        if let Some(tp) = traceparent {
            out.extend_from_slice(b",\"traceparent\":");
            json_str(&mut out, tp);
        }
        out.extend_from_slice(b",\"idempotency_key\":");
        json_str(&mut out, idempotency_key);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn base64_or_null(out: &mut Vec<u8>, data: Option<&[u8]>) {
    let Some(data) = data else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    // Encoded in place: `encoded_length` is exact, and the slice handed over is exactly that
    // long (the encoder asserts it is long enough).
    let start = out.len();
    let len = SIMD_B64.encoded_length(data.len());
    out.resize(start + len, 0);
    let written = SIMD_B64
        .encode(data, base64_simd::Out::from_slice(&mut out[start..start + len]))
        .len();
    out.truncate(start + written);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;
    use bytes::Bytes;

    use super::super::{json_headers, BatchEnvelope, JsonRecord};
    use super::*;
    use crate::record::Record;

    fn record(offset: i64) -> Record {
        Record {
            topic: Arc::from("t\"opic-é"),
            partition: 3,
            offset,
            timestamp_ms: Some(1_700_000_000_000 + offset),
            key: Some(Bytes::from_static(&[0, 255, b'k'])),
            value: Some(Bytes::from(vec![b'v'; 1000 + offset as usize])),
            headers: vec![
                (
                    "traceparent".into(),
                    Some(Bytes::from_static(
                        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                    )),
                ),
                ("héader".into(), None),
                ("bin".into(), Some(Bytes::from_static(&[1, 2, 3]))),
                (
                    Bytes::from_static(b"\xff\xfe"),
                    Some(Bytes::from_static(b"not utf-8 name")),
                ),
                (Bytes::new(), Some(Bytes::new())),
            ],
            generation: 1,
        }
    }

    /// The envelope as the documented types serialize it.
    fn reference(records: &[Outgoing<'_>], attempt: u32) -> Vec<u8> {
        let envelope = BatchEnvelope {
            records: records
                .iter()
                .map(|o| (o.record, o.trace, o.idempotency_key))
                .map(|(r, trace, idempotency_key)| JsonRecord {
                    topic: r.topic.to_string(),
                    partition: r.partition,
                    offset: r.offset,
                    timestamp: r.timestamp_ms,
                    key: r.key.as_ref().map(|k| B64.encode(k)),
                    value: r.value.as_ref().map(|v| B64.encode(v)),
                    headers: json_headers(r),
                    attempt,
                    traceparent: trace
                        .get("traceparent")
                        .cloned()
                        .or_else(|| r.header_str("traceparent").map(str::to_string)),
                    idempotency_key: Some(idempotency_key.to_string()),
                })
                .collect(),
        };
        serde_json::to_vec(&envelope).unwrap()
    }

    #[test]
    fn the_batch_body_is_byte_for_byte_the_serialized_envelope() {
        let full = record(7);
        let bare = Record {
            timestamp_ms: None,
            key: None,
            value: None,
            headers: Vec::new(),
            ..record(8)
        };
        let empty_value = Record {
            value: Some(Bytes::new()),
            headers: vec![("x".into(), Some(Bytes::new()))],
            ..record(9)
        };
        // Numbers at their limits (written with itoa, checked against serde_json's).
        let extremes = Record {
            partition: i32::MAX,
            offset: i64::MAX,
            timestamp_ms: Some(i64::MIN),
            ..record(0)
        };
        let negative = Record {
            partition: -1,
            offset: -1,
            timestamp_ms: Some(-1),
            ..record(0)
        };
        let no_trace = HashMap::new();
        let span_trace = HashMap::from([(
            "traceparent".to_string(),
            "00-11111111111111111111111111111111-2222222222222222-01".to_string(),
        )]);
        let out = |record, trace| Outgoing {
            record,
            trace,
            idempotency_key: "t\"opic-é/3/7-ключ",
            retry: None,
        };
        let cases: Vec<Vec<Outgoing<'_>>> = vec![
            vec![],
            vec![out(&full, &no_trace)],
            vec![
                out(&full, &span_trace),
                out(&bare, &no_trace),
                out(&empty_value, &span_trace),
            ],
            vec![out(&extremes, &no_trace), out(&negative, &no_trace)],
        ];
        for attempt in [0, 4, u32::MAX] {
            for records in &cases {
                let body = batch_body(records, attempt);
                assert_eq!(
                    String::from_utf8(body).unwrap(),
                    String::from_utf8(reference(records, attempt)).unwrap()
                );
            }
        }
    }

    #[test]
    fn simd_base64_matches_the_reference_encoder_at_every_length_and_byte() {
        // Every length up to 300 (each SIMD block size and remainder), all 256 byte values
        // in every position, and a long value; written after other bytes, as in a body.
        let all: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        for len in (0..300).chain([1023, 1024, 1025, 16 * 1024, 70_000]) {
            for shift in [0, 1, 7] {
                let data = &all[shift..shift + len.min(all.len() - shift)];
                let mut out = b"prefix".to_vec();
                base64_or_null(&mut out, Some(data));
                let expected = format!("prefix\"{}\"", B64.encode(data));
                assert_eq!(out, expected.as_bytes(), "length {}", data.len());
            }
        }
        let mut out = Vec::new();
        base64_or_null(&mut out, None);
        assert_eq!(out, b"null");
    }
}
