//! Idempotency keys: where a record's key comes from and how it is made safe to send.
//!
//! The offset key is `{topic}/{partition}/{offset}/{timestamp}` (timestamp in ms since the
//! epoch, omitted only for a record without one). Offsets alone repeat when a topic is
//! deleted and created again (the new incarnation starts at offset 0 again); with the
//! timestamp a record of the new incarnation never matches a done key of the old one, so it
//! is delivered instead of being skipped as a duplicate. librdkafka does not hand consumers
//! the topic id, so the timestamp is what tells the incarnations apart.

use sha2::{Digest, Sha256};

use crate::config::{DedupConfig, KeySource};
use crate::record::Record;

/// Raw keys (record key, header value) longer than this are replaced by their hash.
const MAX_RAW_KEY_LEN: usize = 200;

/// A record's idempotency key and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedKey {
    /// The key, also sent to the app as `Idempotency-Key`.
    pub key: String,
    /// The configured source (key, value or header) was missing or empty, so the offset key
    /// was used instead. Callers count this.
    pub fallback: bool,
}

/// The idempotency key of `record` under `cfg.key` (see [`derive_key`]).
pub fn idempotency_key(cfg: &DedupConfig, record: &Record) -> String {
    derive_key(&cfg.key_source(), record).key
}

/// The idempotency key of `record`, always a valid HTTP header value.
///
/// Record keys and header values made of at most 200 visible ASCII characters are used as
/// they are (an app can match them against its own idempotency table); others become
/// `sha256:<hex of their bytes>`. A missing or empty key or header, or a null value, falls
/// back to the offset key.
pub fn derive_key(source: &KeySource, record: &Record) -> DerivedKey {
    let raw: Option<&[u8]> = match source {
        KeySource::Offset => None,
        KeySource::Key => record.key.as_deref(),
        KeySource::Header(name) => record
            .headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref()),
        KeySource::ValueHash => {
            if let Some(value) = &record.value {
                return DerivedKey {
                    key: hex::encode(Sha256::digest(value)),
                    fallback: false,
                };
            }
            None
        }
    };
    match raw.filter(|b| !b.is_empty()) {
        Some(bytes) => DerivedKey {
            key: header_safe(bytes),
            fallback: false,
        },
        None => DerivedKey {
            key: offset_key(record),
            fallback: *source != KeySource::Offset,
        },
    }
}

/// `{topic}/{partition}/{offset}/{timestamp ms}`, or `{topic}/{partition}/{offset}` for a
/// record without a timestamp. The timestamp keeps the keys of a deleted and re-created
/// topic apart (its offsets start at 0 again). Topic names cannot contain `/`, so the parts
/// never run into each other.
pub fn offset_key(record: &Record) -> String {
    // Built by hand, not with `format!`: this runs for every record (the key is sent to the
    // app with dedup off too), and `core::fmt` costs more than the rest of it.
    let mut numbers = itoa::Buffer::new();
    let mut key = String::with_capacity(record.topic.len() + 3 * 21);
    key.push_str(&record.topic);
    key.push('/');
    key.push_str(numbers.format(record.partition));
    key.push('/');
    key.push_str(numbers.format(record.offset));
    if let Some(ts) = record.timestamp_ms {
        key.push('/');
        key.push_str(numbers.format(ts));
    }
    key
}

fn header_safe(bytes: &[u8]) -> String {
    let visible = bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    match std::str::from_utf8(bytes) {
        Ok(s) if visible && bytes.len() <= MAX_RAW_KEY_LEN => s.to_string(),
        _ => format!("sha256:{}", hex::encode(Sha256::digest(bytes))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;

    fn record(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[(&str, Option<&[u8]>)]) -> Record {
        Record {
            topic: Arc::from("orders"),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1_700_000_000_123),
            key: key.map(Bytes::copy_from_slice),
            value: value.map(Bytes::copy_from_slice),
            headers: headers
                .iter()
                .map(|(k, v)| (Bytes::copy_from_slice(k.as_bytes()), v.map(Bytes::copy_from_slice)))
                .collect(),
            generation: 0,
        }
    }

    fn derived(source: &str, r: &Record) -> DerivedKey {
        derive_key(&KeySource::parse(source).expect("valid source"), r)
    }

    fn used(key: &str) -> DerivedKey {
        DerivedKey {
            key: key.into(),
            fallback: false,
        }
    }

    fn fell_back() -> DerivedKey {
        DerivedKey {
            key: "orders/3/42/1700000000123".into(),
            fallback: true,
        }
    }

    #[test]
    fn key_sources_parse_from_config_strings() {
        assert_eq!(KeySource::parse("offset"), Some(KeySource::Offset));
        assert_eq!(KeySource::parse("key"), Some(KeySource::Key));
        assert_eq!(KeySource::parse("value_hash"), Some(KeySource::ValueHash));
        assert_eq!(
            KeySource::parse("header:idempotency-key"),
            Some(KeySource::Header("idempotency-key".into()))
        );
        for bad in ["", "header:", "Offset", "hash", "header"] {
            assert_eq!(KeySource::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_offset_key_is_topic_partition_offset_timestamp_and_is_never_a_fallback() {
        let r = record(Some(b"k"), Some(b"v"), &[]);
        assert_eq!(
            derived("offset", &r),
            DerivedKey {
                key: "orders/3/42/1700000000123".into(),
                fallback: false
            }
        );
        assert_eq!(
            idempotency_key(&DedupConfig::default(), &r),
            "orders/3/42/1700000000123"
        );
        let no_timestamp = Record {
            timestamp_ms: None,
            ..r
        };
        assert_eq!(derived("offset", &no_timestamp).key, "orders/3/42");
        // Numbers at their limits read as `format!` writes them.
        for (partition, offset, ts) in [(i32::MAX, i64::MAX, i64::MIN), (-1, -1, -1), (0, 0, 0)] {
            let r = Record {
                partition,
                offset,
                timestamp_ms: Some(ts),
                ..no_timestamp.clone()
            };
            assert_eq!(offset_key(&r), format!("orders/{partition}/{offset}/{ts}"));
        }
    }

    #[test]
    fn a_recreated_topic_reusing_an_offset_gets_a_new_offset_key() {
        let old = record(None, Some(b"v"), &[]);
        let new = Record {
            timestamp_ms: Some(1_700_000_900_000),
            ..old.clone()
        };
        assert_eq!(
            (old.topic.clone(), old.partition, old.offset),
            (new.topic.clone(), new.partition, new.offset)
        );
        assert_ne!(derived("offset", &old), derived("offset", &new));
    }

    #[test]
    fn the_record_key_is_used_as_is_and_a_missing_one_falls_back_to_the_offset() {
        assert_eq!(derived("key", &record(Some(b"order-17"), None, &[])), used("order-17"));
        assert_eq!(derived("key", &record(None, Some(b"v"), &[])), fell_back());
        assert_eq!(derived("key", &record(Some(b""), Some(b"v"), &[])), fell_back());
    }

    #[test]
    fn the_value_hash_is_the_hex_sha256_of_the_value_and_a_tombstone_falls_back() {
        let hello = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(derived("value_hash", &record(None, Some(b"hello"), &[])), used(hello));
        assert_eq!(derived("value_hash", &record(Some(b"k"), None, &[])), fell_back());
    }

    #[test]
    fn the_header_key_is_the_first_matching_header_and_a_missing_one_falls_back() {
        let headers: &[(&str, Option<&[u8]>)] = &[
            ("traceparent", Some(b"00-abc")),
            ("idempotency-key", Some(b"evt-1")),
            ("idempotency-key", Some(b"evt-2")),
        ];
        let r = record(Some(b"k"), Some(b"v"), headers);
        assert_eq!(derived("header:idempotency-key", &r), used("evt-1"));
        assert_eq!(
            derived("header:Idempotency-Key", &r),
            fell_back(),
            "names are case-sensitive"
        );
        let null = record(None, None, &[("idempotency-key", None)]);
        assert_eq!(derived("header:idempotency-key", &null), fell_back());
        let cfg = DedupConfig {
            key: "header:idempotency-key".into(),
            ..DedupConfig::default()
        };
        assert_eq!(idempotency_key(&cfg, &r), "evt-1");
    }

    #[test]
    fn keys_that_are_not_safe_header_values_are_replaced_by_their_hash() {
        let hash_of = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
        for raw in [&b"with space"[..], b"caf\xc3\xa9", b"\x00\x01bin", b"line\r\nbreak"] {
            let got = derived("key", &record(Some(raw), None, &[]));
            assert_eq!(got, used(&hash_of(raw)), "{raw:?}");
            assert!(reqwest::header::HeaderValue::from_str(&got.key).is_ok());
        }
        let long = vec![b'x'; MAX_RAW_KEY_LEN + 1];
        assert_eq!(derived("key", &record(Some(&long), None, &[])), used(&hash_of(&long)));
        let longest = vec![b'x'; MAX_RAW_KEY_LEN];
        assert_eq!(
            derived("key", &record(Some(&longest), None, &[])).key.len(),
            MAX_RAW_KEY_LEN
        );
    }
}
