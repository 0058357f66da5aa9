//! kafka-sidecar: consumes Kafka topics as a consumer group and delivers records to an app
//! over HTTP, committing offsets only for finished work.
//!
//! A record's path, top to bottom: [`source`] (poll, rebalance) → [`scheduler`] (ordering,
//! in-flight bound, batching) → [`worker`] (retry loop) → [`delivery`] (HTTP) / [`dlq`] →
//! [`offsets`] (watermark commits). [`app`] wires them together; [`redrive`] is the
//! `dlq inspect|replay` tooling. The stages meet only in
//! [`pipeline`] (the types they hand each other); every Kafka client takes its settings and
//! callbacks from [`kafka_client`]. docs/architecture.md walks a record through the modules
//! and states who may import whom (checked by `tests/architecture.rs`).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod breaker;
pub mod config;
pub mod connectivity;
pub mod dedup;
pub mod delivery;
pub mod dlq;
pub mod kafka_client;
pub mod lag;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod ratelimit;
pub mod record;
pub mod redrive;
pub mod retry;
pub mod retry_topics;
pub mod scheduler;
pub mod source;
pub mod telemetry;
pub mod worker;
