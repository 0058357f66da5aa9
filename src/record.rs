//! The record as it travels through the pipeline: an owned copy of a Kafka message
//! plus the assignment generation it was read under.
//!
//! Copying a message never fails and never panics, whatever its content: keys, values,
//! header names and header values are kept as bytes ([`native`] reads headers without
//! rdkafka's accessors, which panic on a header name that is not UTF-8).

use std::sync::Arc;

use bytes::Bytes;
use rdkafka::message::{BorrowedMessage, Message};

#[allow(unsafe_code)]
pub mod native;

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
    /// Record headers in order, duplicates kept: name and value as bytes (a name need not
    /// be UTF-8); a header value may be null.
    pub headers: Vec<(Bytes, Option<Bytes>)>,
    /// Assignment generation of the partition when the record was read; completions
    /// from an older generation are ignored by the offset tracker.
    pub generation: u64,
}

impl Record {
    /// Copies a message out of librdkafka's buffers.
    pub fn from_message(msg: &BorrowedMessage<'_>, topic: Arc<str>, generation: u64) -> Self {
        let headers = native::read(msg).unwrap_or_else(|e| {
            // librdkafka refuses to parse some header blocks (over 100,000 headers); the
            // record itself is still delivered, so say loudly what is missing.
            tracing::error!(
                topic = %topic, partition = msg.partition(), offset = msg.offset(), error = %e,
                "librdkafka could not read the headers of a record; delivering it without headers"
            );
            Vec::new()
        });
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

    /// The value of the first header with this name, as UTF-8 (`None` if it is not UTF-8).
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .and_then(|(_, v)| v.as_ref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}
