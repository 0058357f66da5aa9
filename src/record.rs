//! The record as it travels through the pipeline: an owned copy of a Kafka message
//! plus the assignment generation it was read under.

use std::sync::Arc;

use bytes::Bytes;
use rdkafka::message::{BorrowedMessage, Headers, Message};

/// An owned Kafka record.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch, when the broker or producer set one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    /// Record headers in order; a header value may be null.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Assignment generation of the partition when the record was read; completions
    /// from an older generation are ignored by the offset tracker.
    pub generation: u64,
}

impl Record {
    /// Copies a message out of librdkafka's buffers.
    pub fn from_message(msg: &BorrowedMessage<'_>, topic: Arc<str>, generation: u64) -> Self {
        let headers = msg
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(Bytes::copy_from_slice)))
                    .collect()
            })
            .unwrap_or_default();
        Record {
            topic,
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
            key: msg.key().map(Bytes::copy_from_slice),
            value: msg.payload().map(Bytes::copy_from_slice),
            headers,
            generation,
        }
    }

    /// Bytes this record holds in memory (key, value, headers), for the in-flight bound.
    pub fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Bytes::len))
            .sum();
        self.key.as_ref().map_or(0, Bytes::len) + self.value.as_ref().map_or(0, Bytes::len) + headers + 64
    }

    /// The value of the first header with this name, as UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_ref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}
