//! Dead-letter topic: poison and exhausted records are written here with their original key,
//! value and headers plus `x-dlq-*` headers saying where they came from and why.
//!
//! A write counts only when the broker acknowledged it (idempotent producer, acks=all).
//! A failing write is retried with backoff until it succeeds or shutdown's hard stop.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, RetryConfig};
use crate::record::{native, Record};
use crate::retry::{Backoff, ErrorInfo};
use crate::source::connection_config;

/// Header names added to dead-lettered records.
pub mod headers {
    pub const SOURCE_TOPIC: &str = "x-dlq-source-topic";
    pub const SOURCE_PARTITION: &str = "x-dlq-source-partition";
    pub const SOURCE_OFFSET: &str = "x-dlq-source-offset";
    pub const SOURCE_TIMESTAMP: &str = "x-dlq-source-timestamp";
    pub const CONSUMER_GROUP: &str = "x-dlq-consumer-group";
    pub const ATTEMPTS: &str = "x-dlq-attempts";
    pub const ERROR_CLASS: &str = "x-dlq-error-class";
    pub const ERROR_MESSAGE: &str = "x-dlq-error-message";
}

/// The dead-letter producer.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
    group: String,
    retry: RetryConfig,
}

/// The write was given up because shutdown's grace period ran out.
#[derive(Debug)]
pub struct Interrupted;

impl DeadLetters {
    /// Builds the producer; `None` when no DLQ topic is configured.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Option<Self>> {
        if cfg.dlq.topic.is_empty() {
            return Ok(None);
        }
        let mut cc = connection_config(cfg, "-dlq");
        cc.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        for (k, v) in &cfg.dlq.properties {
            cc.set(k, v);
        }
        let producer: FutureProducer = cc
            .create()
            .map_err(|e| anyhow::anyhow!("failed to create the DLQ producer: {e}"))?;
        Ok(Some(Self {
            producer,
            topic: cfg.dlq.topic.clone(),
            group: cfg.kafka.group_id.clone(),
            retry: cfg.retry.clone(),
        }))
    }

    /// Writes a record to the DLQ, retrying until the broker acknowledges it.
    pub async fn send(
        &self,
        record: &Record,
        attempts: u32,
        error: &ErrorInfo,
        trace: &HashMap<String, String>,
        hard_stop: &CancellationToken,
    ) -> Result<(), Interrupted> {
        let headers = self.headers(record, attempts, error, trace);
        let mut backoff = Backoff::from_config(&self.retry);
        loop {
            let mut out = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers.clone());
            if let Some(k) = &record.key {
                out = out.key(k.as_ref());
            }
            if let Some(v) = &record.value {
                out = out.payload(v.as_ref());
            }
            let sent = tokio::select! {
                r = self.producer.send(out, Timeout::After(Duration::from_secs(30))) => r,
                _ = hard_stop.cancelled() => return Err(Interrupted),
            };
            match sent {
                Ok(_) => return Ok(()),
                Err((e, _)) => {
                    let delay = backoff.next_delay();
                    tracing::error!(
                        dlq_topic = %self.topic, topic = %record.topic, partition = record.partition,
                        offset = record.offset, error = %e, retry_in = ?delay,
                        "failed to write a record to the dead-letter topic; retrying (the record stays unfinished)"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = hard_stop.cancelled() => return Err(Interrupted),
                    }
                }
            }
        }
    }

    fn headers(&self, r: &Record, attempts: u32, error: &ErrorInfo, trace: &HashMap<String, String>) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(r.headers.len() + 8);
        // Original headers, byte for byte (names need not be UTF-8), except a trace context
        // replaced by the delivery span's.
        let replaced = |name: &[u8]| std::str::from_utf8(name).is_ok_and(|n| trace.contains_key(n));
        for (name, value) in r.headers.iter().filter(|(name, _)| !replaced(name)) {
            h = native::add(h, name, value.as_deref());
        }
        for (name, value) in trace {
            h = h.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let ts = r.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
        let fields = [
            (headers::SOURCE_TOPIC, r.topic.to_string()),
            (headers::SOURCE_PARTITION, r.partition.to_string()),
            (headers::SOURCE_OFFSET, r.offset.to_string()),
            (headers::SOURCE_TIMESTAMP, ts),
            (headers::CONSUMER_GROUP, self.group.clone()),
            (headers::ATTEMPTS, attempts.to_string()),
            (headers::ERROR_CLASS, error.class.clone()),
            (headers::ERROR_MESSAGE, error.message.clone()),
        ];
        for (key, value) in &fields {
            h = h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        h
    }

    /// Waits for queued writes to be acknowledged (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "DLQ producer did not flush in time");
        }
    }
}
