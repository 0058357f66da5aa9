//! Configuration: built-in defaults < TOML file < environment variables.
//!
//! Every field carries a `///` doc: it is the user documentation, mirrored in
//! `config.toml.example`. Loading reports *every* problem it finds (unknown keys,
//! wrong types, bad durations, missing required values) with the key's full path,
//! so an operator fixes a ConfigMap in one round trip.
//!
//! Where config lives (one rule, checked by `tests/architecture.rs`): every section's struct
//! is in this module — the small ones here, the larger ones in their own file
//! (`config/breaker.rs`, `config/dedup.rs`, `config/rate_limit.rs`, `config/retry_topics.rs`,
//! `config/telemetry.rs`);
//! the module a section configures re-exports it (`breaker::BreakerConfig`). This module
//! imports no other module of the crate, so any module may import it. The plumbing has its
//! own files: loading (figment: defaults < file < environment) in `load`, environment mapping
//! in [`env`], redaction in [`redact`], durations in [`duration`].
//!
//! Guarantees: environment values for text fields stay text ([`env`]); every duration is
//! bounded so clock arithmetic cannot overflow ([`duration`]); no secret reaches an output
//! ([`redact`]); loading never panics, whatever the TOML text or environment (property
//! tested in `proptests`).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Deserializer, Serialize};

mod app_url;
mod breaker;
mod dedup;
pub mod duration;
mod env;
mod load;
#[cfg(test)]
mod proptests;
pub(crate) mod rate_limit;
pub mod redact;
mod retry_topics;
mod telemetry;

pub use self::app_url::AppTarget;
pub use self::breaker::BreakerConfig;
pub use self::dedup::{DedupConfig, KeySource, OnError};
pub use self::rate_limit::RateLimitConfig;
pub use self::redact::url as redact_url;
pub use self::retry_topics::{RetryTopicsConfig, TierConfig};
pub use self::telemetry::TelemetryConfig;

/// Prefix of environment variables that override config keys:
/// `KAFKA_SIDECAR_<SECTION>__<KEY>`, e.g. `KAFKA_SIDECAR_KAFKA__BROKERS`.
pub const ENV_PREFIX: &str = "KAFKA_SIDECAR_";

/// The whole configuration, one struct per section of the TOML file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka consumer group settings.
    pub kafka: KafkaConfig,
    /// Where and how records are delivered to the app.
    pub app: AppConfig,
    /// Ordering, concurrency and memory bounds.
    pub pipeline: PipelineConfig,
    /// Batch delivery (used when `app.mode = "batch"`).
    pub batch: BatchConfig,
    /// Retry policy for failed deliveries.
    pub retry: RetryConfig,
    /// Dead-letter topic for poison records.
    pub dlq: DlqConfig,
    /// Delayed retries through retry-tier topics (off by default).
    pub retry_topics: RetryTopicsConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Admin HTTP server (metrics, health, status).
    pub admin: AdminConfig,
    /// Logging.
    pub log: LogConfig,
    /// OpenTelemetry traces.
    pub telemetry: TelemetryConfig,
    /// Delivery rate limits and adaptive concurrency.
    pub rate_limit: RateLimitConfig,
    /// Circuit breaker on the app.
    pub breaker: BreakerConfig,
    /// Deduplication by idempotency key (Redis, or in memory for one process).
    pub dedup: DedupConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma separated ("host:9092,host2:9092"). Required.
    #[serde(deserialize_with = "lenient_string")]
    pub brokers: String,
    /// Consumer group id. Required.
    #[serde(deserialize_with = "lenient_string")]
    pub group_id: String,
    /// Topics to consume. Required. A list, or a comma-separated string (handy in env vars).
    #[serde(deserialize_with = "string_or_list")]
    pub topics: Vec<String>,
    /// Static membership id (e.g. the pod name; the Helm chart sets it): a restarted member takes its
    /// partitions back at once. Empty: dynamic membership (after a crash they wait session_timeout).
    #[serde(deserialize_with = "lenient_string")]
    pub group_instance_id: String,
    /// Kafka client id, shown in broker logs and quotas.
    #[serde(deserialize_with = "lenient_string")]
    pub client_id: String,
    /// Partition assignment strategy: "cooperative-sticky", "range" or "roundrobin".
    #[serde(deserialize_with = "lenient_string")]
    pub assignment_strategy: String,
    /// Where a group without committed offsets starts: "earliest" or "latest".
    #[serde(deserialize_with = "lenient_string")]
    pub auto_offset_reset: String,
    /// Group session timeout: a member silent this long is removed from the group.
    #[serde(with = "crate::config::duration")]
    pub session_timeout: Duration,
    /// How often the finished-offset watermark is committed.
    #[serde(with = "crate::config::duration")]
    pub commit_interval: Duration,
    /// On partition revoke: how long to wait for in-flight work of the revoked partitions before committing.
    #[serde(with = "crate::config::duration")]
    pub revoke_drain_timeout: Duration,
    /// Any librdkafka consumer property, passed through verbatim (security.protocol, sasl.*, ssl.*, ...).
    /// They override the settings above. Each is checked by librdkafka at load (an unknown
    /// name is an invalid config). Secret-looking and unknown names are never printed (see
    /// [`redact`]).
    #[serde(deserialize_with = "scalar_map")]
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            group_id: String::new(),
            topics: Vec::new(),
            group_instance_id: String::new(),
            client_id: "kafka-sidecar".into(),
            assignment_strategy: "cooperative-sticky".into(),
            auto_offset_reset: "earliest".into(),
            session_timeout: Duration::from_secs(45),
            commit_interval: Duration::from_secs(5),
            revoke_drain_timeout: Duration::from_secs(20),
            properties: BTreeMap::new(),
        }
    }
}

/// How records are sent to the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// One HTTP request per record; the body is the record value.
    Single,
    /// One HTTP request per batch; the body is a JSON envelope.
    Batch,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// Where the records are POSTed. Required. An http:// or https:// URL, or a Unix domain
    /// socket and an HTTP path: "unix:///var/run/app/app.sock:/records" (socket path up to the
    /// first ':', which it cannot contain; plain HTTP with Host: localhost).
    #[serde(deserialize_with = "lenient_string")]
    pub url: String,
    /// "single" (one record per request) or "batch" (JSON envelope, see README).
    pub mode: DeliveryMode,
    /// Timeout of one delivery request; a timeout is retried like a 5xx.
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// Timeout for establishing a TCP connection to the app.
    #[serde(with = "crate::config::duration")]
    pub connect_timeout: Duration,
    /// Readiness gate: when set, the sidecar joins the consumer group only after a GET here
    /// answers 2xx (so it never consumes before the app can take records). Empty: no gate.
    /// With a unix:// `url`, the same socket: "unix:///var/run/app/app.sock:/healthz".
    #[serde(deserialize_with = "lenient_string")]
    pub health_url: String,
    /// Extra HTTP headers sent with every request (e.g. an auth token).
    #[serde(deserialize_with = "scalar_map")]
    pub headers: BTreeMap<String, String>,
    /// Single mode: the most bytes of metadata headers one record may need (`X-Kafka-Key`,
    /// `X-Kafka-Headers`, ... counted as `name: value\r\n`). A record over it is not sent:
    /// it is dead-lettered with error class `headers_too_large`. Proxies and servers reject
    /// large headers (nginx: 431 over 8KiB); batch mode carries metadata in the body instead.
    pub max_header_bytes: ByteSize,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            mode: DeliveryMode::Single,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            health_url: String::new(),
            headers: BTreeMap::new(),
            max_header_bytes: ByteSize::kib(8),
        }
    }
}

/// Which records must be delivered one after another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Strict order per partition: one record (or batch) per partition at a time.
    Partition,
    /// Order per record key, parallel across keys. Records without a key are unordered.
    Key,
    /// No ordering: any record may be delivered at any time.
    Unordered,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// "partition", "key" or "unordered".
    pub ordering: Ordering,
    /// Maximum concurrent deliveries to the app (HTTP requests in flight).
    pub workers: usize,
    /// Maximum records held in memory (polled but not finished). Partitions pause above it.
    pub max_in_flight_records: usize,
    /// Maximum bytes (keys + values + headers) held in memory. Partitions pause above it.
    pub max_in_flight_bytes: ByteSize,
    /// Paused partitions resume when both counts fall below this fraction of their maximum.
    pub resume_threshold: f64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            ordering: Ordering::Key,
            workers: 16,
            max_in_flight_records: 1000,
            max_in_flight_bytes: ByteSize::mib(32),
            resume_threshold: 0.5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Maximum records in one batch request.
    pub max_records: usize,
    /// Maximum bytes of record data in one batch request.
    pub max_bytes: ByteSize,
    /// How long to wait for a batch to fill before sending it anyway.
    #[serde(with = "crate::config::duration")]
    pub linger: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: 100,
            max_bytes: ByteSize::mib(1),
            linger: Duration::from_millis(20),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts for a record answered with a retryable status or timing out; then it is dead-lettered.
    pub max_attempts: u32,
    /// First backoff; each retry doubles it (full jitter), up to `max_backoff`.
    #[serde(with = "crate::config::duration")]
    pub initial_backoff: Duration,
    /// Cap of the retry backoff (also of `Retry-After` and of outage probing).
    #[serde(with = "crate::config::duration")]
    pub max_backoff: Duration,
    /// HTTP statuses that mark a record as poison: dead-lettered at once, never retried.
    pub non_retryable_statuses: Vec<u16>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            non_retryable_statuses: vec![400, 413, 415, 422],
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DlqConfig {
    /// Dead-letter topic. Empty: no DLQ; an exhausted record then blocks its lane (never dropped).
    #[serde(deserialize_with = "lenient_string")]
    pub topic: String,
    /// Extra librdkafka producer properties for the DLQ producer (on top of `kafka.properties`).
    #[serde(deserialize_with = "scalar_map")]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM: time to finish records already read before committing and leaving the group.
    #[serde(with = "crate::config::duration")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(25),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address of the admin server (/metrics, /healthz, /readyz, /status). Empty: disabled.
    #[serde(deserialize_with = "lenient_string")]
    pub listen: String,
    /// How often consumer lag (partition end offsets) is refreshed, even when no records flow.
    #[serde(with = "crate::config::duration")]
    pub lag_interval: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9464".into(),
            lag_interval: Duration::from_secs(5),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Log filter (`info`, `debug`, `kafka_sidecar=debug,info`). `RUST_LOG` overrides it.
    #[serde(deserialize_with = "lenient_string")]
    pub level: String,
    /// "text" or "json".
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// One problem in the configuration, with the full key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub key: String,
    pub reason: String,
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigIssue>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration ({} problem(s)):", self.0.len())?;
        for issue in &self.0 {
            writeln!(f, "  {}: {}", issue.key, issue.reason)?;
        }
        Ok(())
    }
}

impl Config {
    /// Semantic checks that serde cannot express. Appends one issue per problem.
    fn validate(&self, issues: &mut Vec<ConfigIssue>) {
        let mut bad = |key: &str, reason: &str| {
            issues.push(ConfigIssue {
                key: key.into(),
                reason: reason.into(),
            })
        };
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            bad("kafka.brokers", "is required (e.g. \"127.0.0.1:9092\")");
        }
        if k.group_id.trim().is_empty() {
            bad("kafka.group_id", "is required");
        }
        if k.topics.is_empty() || k.topics.iter().any(|t| t.trim().is_empty()) {
            bad("kafka.topics", "is required: a non-empty list of topic names");
        }
        if !["cooperative-sticky", "range", "roundrobin"].contains(&k.assignment_strategy.as_str()) {
            bad(
                "kafka.assignment_strategy",
                "must be \"cooperative-sticky\", \"range\" or \"roundrobin\"",
            );
        }
        if !["earliest", "latest"].contains(&k.auto_offset_reset.as_str()) {
            bad("kafka.auto_offset_reset", "must be \"earliest\" or \"latest\"");
        }
        // librdkafka's range for session.timeout.ms: refused at start-up otherwise.
        if k.session_timeout < Duration::from_millis(1) || k.session_timeout > Duration::from_secs(3600) {
            bad("kafka.session_timeout", "must be between 1ms and 1h");
        }
        if k.commit_interval.is_zero() {
            bad("kafka.commit_interval", "must be greater than 0");
        }
        let target = AppTarget::parse(&self.app.url);
        if let Err(e) = &target {
            bad("app.url", e);
        }
        if !self.app.health_url.is_empty() {
            match (AppTarget::parse(&self.app.health_url), &target) {
                (Err(_), _) => bad("app.health_url", "is not a valid URL"),
                // One client serves both: over a socket, the health check uses the same socket.
                (Ok(health), Ok(app)) if health.socket() != app.socket() => bad(
                    "app.health_url",
                    "must use the same transport as app.url (with a unix:// app.url, the same socket: \"unix://<socket>:/healthz\")",
                ),
                _ => {}
            }
        }
        if self.app.timeout.is_zero() {
            bad("app.timeout", "must be greater than 0");
        }
        for name in self.app.headers.keys() {
            if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                bad(&format!("app.headers.{name}"), "is not a valid HTTP header name");
            }
        }
        if self.app.max_header_bytes.as_u64() < 1024 {
            bad("app.max_header_bytes", "must be at least 1KiB");
        }
        let p = &self.pipeline;
        if p.workers == 0 {
            bad("pipeline.workers", "must be at least 1");
        }
        if p.max_in_flight_records == 0 {
            bad("pipeline.max_in_flight_records", "must be at least 1");
        }
        if p.max_in_flight_bytes.as_u64() < 1024 {
            bad("pipeline.max_in_flight_bytes", "must be at least 1KiB");
        }
        if !(p.resume_threshold > 0.0 && p.resume_threshold < 1.0) {
            bad("pipeline.resume_threshold", "must be between 0 and 1 (exclusive)");
        }
        if self.batch.max_records == 0 {
            bad("batch.max_records", "must be at least 1");
        }
        if self.batch.max_bytes.as_u64() == 0 {
            bad(
                "batch.max_bytes",
                "must be at least 1 byte (a record larger than it still goes alone)",
            );
        }
        if self.retry.max_attempts == 0 {
            bad("retry.max_attempts", "must be at least 1");
        }
        if self.retry.initial_backoff.is_zero() || self.retry.initial_backoff > self.retry.max_backoff {
            bad(
                "retry.initial_backoff",
                "must be greater than 0 and at most retry.max_backoff",
            );
        }
        for s in &self.retry.non_retryable_statuses {
            if !(400..=599).contains(s) {
                bad("retry.non_retryable_statuses", &format!("{s} is not a 4xx/5xx status"));
            }
        }
        if self.shutdown.grace_period < Duration::from_secs(1) {
            bad("shutdown.grace_period", "must be at least 1s");
        }
        if self.admin.lag_interval < Duration::from_millis(100) {
            bad("admin.lag_interval", "must be at least 100ms");
        }
        let mut more = Vec::new();
        self.telemetry.validate(&mut more);
        self.rate_limit.validate(&mut more);
        self.breaker.validate(&mut more);
        self.dedup.validate(&mut more);
        self.retry_topics
            .validate(&self.kafka.topics, self.dlq.topic.trim(), &mut more);
        for (key, reason) in more {
            bad(&key, &reason);
        }
        if self.dedup.enabled && self.dedup.lease_ttl <= self.app.timeout {
            bad(
                "dedup.lease_ttl",
                "must be longer than app.timeout, or a lease could expire while its record is being delivered",
            );
        }
        if !self.admin.listen.is_empty() && self.admin.listen.parse::<std::net::SocketAddr>().is_err() {
            bad(
                "admin.listen",
                "must be an address like \"0.0.0.0:9464\" (or empty to disable)",
            );
        }
        validate_properties("kafka", &self.kafka.properties, issues);
        validate_properties("dlq", &self.dlq.properties, issues);
    }

    /// The effective configuration as TOML, with secrets replaced by `"<redacted>"` (see
    /// [`redact`]): secret-named and unknown librdkafka properties, secret-named headers,
    /// URL userinfo, and then any secret value wherever else it appears.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        for props in [&mut c.kafka.properties, &mut c.dlq.properties] {
            for (key, value) in props.iter_mut() {
                *value = redact::property_value(key, value);
            }
        }
        for (name, value) in c.app.headers.iter_mut() {
            *value = redact::header_value(name, value);
        }
        c.app.url = redact::url(&c.app.url);
        c.app.health_url = redact::url(&c.app.health_url);
        c.telemetry.otlp_endpoint = redact::url(&c.telemetry.otlp_endpoint);
        c.dedup = c.dedup.redacted();
        let text = toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"));
        redact::Scrubber::from_config(self).scrub(&text).into_owned()
    }
}

/// librdkafka checks each property name and value as it is set: do that at load so a typo
/// is an invalid config naming its key, and the error never shows the value.
fn validate_properties(section: &str, props: &BTreeMap<String, String>, issues: &mut Vec<ConfigIssue>) {
    for (name, value) in props {
        let checked = rdkafka::ClientConfig::new().set(name, value).create_native_config();
        if let Err(e) = checked {
            issues.push(ConfigIssue {
                key: format!("{section}.properties.{name}"),
                reason: redact::kafka_config_reason(&e),
            });
        }
    }
}

/// Accepts `["a", "b"]` or `"a,b"`.
pub(crate) fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(Scalar),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => String::from(s)
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

/// A string, number or boolean, kept as text.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl From<Scalar> for String {
    fn from(v: Scalar) -> String {
        match v {
            Scalar::Bool(b) => b.to_string(),
            Scalar::Int(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Str(s) => s,
        }
    }
}

/// A string field that also accepts a number or boolean (env values like `GROUP_ID=1234`).
pub(crate) fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Scalar::deserialize(d).map(String::from)
}

/// librdkafka properties are strings; TOML lets users write numbers and booleans too.
fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, Scalar>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.into())).collect())
}

#[cfg(test)]
mod tests {

    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load_with_env(Some(&path), env)
    }

    const MINIMAL: &str = r#"
        [kafka]
        brokers = "127.0.0.1:9092"
        group_id = "g"
        topics = ["t"]
        [app]
        url = "http://127.0.0.1:8080/"
    "#;

    fn keys(e: ConfigError) -> Vec<String> {
        e.0.into_iter().map(|i| i.key).collect()
    }

    #[test]
    fn minimal_config_loads_with_defaults() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.kafka.topics, vec!["t"]);
        assert_eq!(c.pipeline.ordering, Ordering::Key);
        assert_eq!(c.retry.non_retryable_statuses, vec![400, 413, 415, 422]);
        assert_eq!(c.kafka.commit_interval, Duration::from_secs(5));
    }

    #[test]
    fn dedup_on_with_every_other_value_default_is_valid_and_its_redis_password_is_redacted() {
        let c = load(
            MINIMAL,
            &[
                ("KAFKA_SIDECAR_DEDUP__ENABLED", "true"),
                ("KAFKA_SIDECAR_DEDUP__REDIS_URL", "redis://:hunter2@redis:6379/0"),
            ],
        )
        .unwrap();
        assert!(c.dedup.enabled);
        let shown = c.redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        let e = load(
            MINIMAL,
            &[
                ("KAFKA_SIDECAR_DEDUP__ENABLED", "true"),
                ("KAFKA_SIDECAR_DEDUP__LEASE_TTL", "5s"),
                ("KAFKA_SIDECAR_APP__TIMEOUT", "10s"),
            ],
        )
        .unwrap_err();
        assert_eq!(keys(e), ["dedup.lease_ttl"]);
    }

    #[test]
    fn env_overrides_file_and_sets_librdkafka_properties() {
        let c = load(
            MINIMAL,
            &[
                ("KAFKA_SIDECAR_KAFKA__TOPICS", "a, b"),
                ("KAFKA_SIDECAR_PIPELINE__WORKERS", "7"),
                ("KAFKA_SIDECAR_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
                ("KAFKA_SIDECAR_RETRY__MAX_BACKOFF", "2s"),
                ("KAFKA_SIDECAR_RETRY__NON_RETRYABLE_STATUSES", "[400, 409]"),
                ("KAFKA_SIDECAR_KAFKA__GROUP_ID", "1234"),
                ("KAFKA_SIDECAR_CONFIG", "/ignored/by/the/loader"),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.topics, vec!["a", "b"]);
        assert_eq!(c.pipeline.workers, 7);
        assert_eq!(c.retry.max_backoff, Duration::from_secs(2));
        assert_eq!(c.kafka.properties["sasl.password"], "hunter2");
        assert_eq!(c.retry.non_retryable_statuses, vec![400, 409]);
        assert_eq!(c.kafka.group_id, "1234");
        let shown = c.redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn env_values_for_text_fields_stay_text_and_numbers_still_parse() {
        let c = load(
            MINIMAL,
            &[
                ("KAFKA_SIDECAR_KAFKA__GROUP_ID", "007"),
                ("KAFKA_SIDECAR_KAFKA__TOPICS", "007"),
                ("KAFKA_SIDECAR_KAFKA__CLIENT_ID", "1e3"),
                ("KAFKA_SIDECAR_TELEMETRY__SERVICE_NAME", "42"),
                ("KAFKA_SIDECAR_PIPELINE__WORKERS", "012"),
                ("KAFKA_SIDECAR_PIPELINE__MAX_IN_FLIGHT_BYTES", "1048576"),
                ("KAFKA_SIDECAR_PIPELINE__RESUME_THRESHOLD", "0.25"),
                ("KAFKA_SIDECAR_BREAKER__ENABLED", "false"),
                ("KAFKA_SIDECAR_DLQ__PROPERTIES__COMPRESSION_TYPE", "zstd"),
                ("KAFKA_SIDECAR_DLQ__PROPERTIES__LINGER_MS", "007"),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.group_id, "007", "the group is \"007\", not 7");
        assert_eq!(c.kafka.topics, ["007"]);
        assert_eq!(c.kafka.client_id, "1e3");
        assert_eq!(c.telemetry.service_name, "42");
        assert_eq!(c.pipeline.workers, 12);
        assert_eq!(c.pipeline.max_in_flight_bytes, ByteSize::mib(1));
        assert_eq!(c.pipeline.resume_threshold, 0.25);
        assert!(!c.breaker.enabled);
        assert_eq!(c.dlq.properties["compression.type"], "zstd");
        assert_eq!(c.dlq.properties["linger.ms"], "007");
        let e = load(MINIMAL, &[("KAFKA_SIDECAR_PIPELINE__WORKERS", "many")]).unwrap_err();
        assert_eq!(keys(e), ["pipeline.workers"]);
    }

    /// Every duration key of every section, found in the defaults (their values parse as
    /// durations), so a new duration field is covered without editing this test.
    fn duration_keys() -> Vec<String> {
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut keys = Vec::new();
        for (section, table) in defaults.as_table().unwrap() {
            for (key, value) in table.as_table().unwrap() {
                if value.as_str().is_some_and(|v| humantime::parse_duration(v).is_ok()) {
                    keys.push(format!("{section}.{key}"));
                }
            }
        }
        keys
    }

    #[test]
    fn durations_that_would_overflow_the_clock_are_rejected_naming_the_key() {
        let keys_found = duration_keys();
        assert!(keys_found.len() >= 18, "{keys_found:?}");
        for key in &keys_found {
            let var = format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', "__"));
            let e = load(MINIMAL, &[(&var, "1000000000 years")]).unwrap_err();
            let issue = e.0.iter().find(|i| &i.key == key);
            assert!(issue.is_some(), "{key}: {e}");
            assert!(issue.unwrap().reason.contains("at most 100 years"), "{e}");
        }
        let (section, key) = keys_found[0].split_once('.').unwrap();
        let e = load(&format!("{MINIMAL}\n[{section}]\n{key} = \"200y\"\n"), &[]).unwrap_err();
        assert!(keys(e).contains(&keys_found[0]));
    }

    #[test]
    fn a_session_timeout_librdkafka_would_refuse_is_invalid_at_load() {
        let e = load(MINIMAL, &[("KAFKA_SIDECAR_KAFKA__SESSION_TIMEOUT", "2h")]).unwrap_err();
        assert_eq!(keys(e), ["kafka.session_timeout"]);
        assert!(load(MINIMAL, &[("KAFKA_SIDECAR_KAFKA__SESSION_TIMEOUT", "1h")]).is_ok());
    }

    #[test]
    fn a_misspelled_librdkafka_property_is_invalid_and_its_value_is_never_shown() {
        let toml = format!(
            "{MINIMAL}\n[kafka.properties]\n\"sasl.pasword\" = \"hunter22\"\n[dlq.properties]\n\"linger.ms\" = \"soon-ish\"\n"
        );
        let e = load(&toml, &[]).unwrap_err();
        assert_eq!(
            keys(e.clone()),
            ["kafka.properties.sasl.pasword", "dlq.properties.linger.ms"]
        );
        let shown = e.to_string();
        assert!(!shown.contains("hunter22") && !shown.contains("soon-ish"), "{shown}");
        assert!(shown.contains("no such configuration property"), "{shown}");
    }

    #[test]
    fn a_toml_syntax_error_does_not_quote_the_line() {
        let toml = format!("{MINIMAL}\n[kafka.properties]\n\"sasl.password\" = \"hunter22\n");
        let e = load(&toml, &[]).unwrap_err();
        let shown = e.to_string();
        assert!(!shown.contains("hunter22"), "{shown}");
        assert_eq!(keys(e), ["config file"]);
        assert!(shown.contains("line 10"), "{shown}");
    }

    #[test]
    fn type_errors_in_secret_keys_do_not_quote_the_value() {
        let toml = format!("{MINIMAL}\n[dedup]\nredis_url = [\"redis://:hunter22@h\"]\n");
        let e = load(&toml, &[]).unwrap_err();
        assert_eq!(keys(e.clone()), ["dedup.redis_url"]);
        let toml = MINIMAL.replace(
            "url = \"http://127.0.0.1:8080/\"",
            "url = { x = \"http://u:hunter22@h/\" }",
        );
        let e = load(&toml, &[]).unwrap_err();
        assert!(!e.to_string().contains("hunter22"), "{e}");
        // serde quotes the string it found where a map was expected.
        let e = load(
            MINIMAL,
            &[("KAFKA_SIDECAR_KAFKA__PROPERTIES", "sasl.password=hunter22")],
        )
        .unwrap_err();
        assert_eq!(keys(e.clone()), ["kafka.properties"]);
        assert!(
            !e.to_string().contains("hunter22") && e.to_string().contains("<redacted>"),
            "{e}"
        );
        let c = load(
            MINIMAL,
            &[
                ("KAFKA_SIDECAR_APP__HEALTH_URL", "http://u:hunter22@127.0.0.1/health"),
                (
                    "KAFKA_SIDECAR_TELEMETRY__OTLP_ENDPOINT",
                    "http://u:otlp-pw@127.0.0.1:4318/v1/traces",
                ),
                ("KAFKA_SIDECAR_APP__HEADERS__AUTHORIZATION", "Bearer tok-123"),
            ],
        )
        .unwrap();
        let shown = c.redacted_toml();
        for secret in ["hunter22", "otlp-pw", "tok-123"] {
            assert!(!shown.contains(secret), "{secret}: {shown}");
        }
    }

    #[test]
    fn sizes_and_property_scalars_parse() {
        let toml = format!(
            "{MINIMAL}\n[pipeline]\nmax_in_flight_bytes = \"8MiB\"\n[kafka.properties]\n\"fetch.max.bytes\" = 1048576\n\"enable.partition.eof\" = false\n"
        );
        // `[kafka.properties]` after `[app]` is fine in TOML; this checks scalars become strings.
        let c = load(&toml, &[]).unwrap();
        assert_eq!(c.pipeline.max_in_flight_bytes, ByteSize::mib(8));
        assert_eq!(c.kafka.properties["fetch.max.bytes"], "1048576");
        assert_eq!(c.kafka.properties["enable.partition.eof"], "false");
    }

    #[test]
    fn every_problem_is_reported_with_its_full_key() {
        let e = load(
            r#"
            [kafka]
            brokerz = "x"
            [app]
            url = "http://x/"
            timeout = "soon"
            [pipeline]
            workers = "many"
            [bogus]
            a = 1
            "#,
            &[],
        )
        .unwrap_err();
        let keys = keys(e);
        assert!(keys.contains(&"kafka.brokerz".to_string()), "{keys:?}");
        assert!(keys.contains(&"app.timeout".to_string()), "{keys:?}");
        assert!(keys.contains(&"pipeline.workers".to_string()), "{keys:?}");
        assert!(keys.contains(&"bogus".to_string()), "{keys:?}");
    }

    #[test]
    fn missing_required_values_are_named() {
        let e = load("[app]\nurl = \"http://x/\"\n", &[]).unwrap_err();
        let keys = keys(e);
        assert_eq!(keys, vec!["kafka.brokers", "kafka.group_id", "kafka.topics"]);
    }

    #[test]
    fn semantic_errors_are_collected() {
        let toml = format!("{MINIMAL}\n[retry]\nmax_attempts = 0\nnon_retryable_statuses = [200]\n");
        let keys = keys(load(&toml, &[]).unwrap_err());
        assert_eq!(keys, vec!["retry.max_attempts", "retry.non_retryable_statuses"]);
    }

    #[test]
    fn a_unix_socket_app_url_is_accepted_and_a_bad_one_is_named_with_its_reason() {
        let base = MINIMAL.replace(
            "url = \"http://127.0.0.1:8080/\"",
            "url = \"unix:///run/app/app.sock:/records\"",
        );
        let c = load(&base, &[]).unwrap();
        assert_eq!(c.app.url, "unix:///run/app/app.sock:/records");
        let health = format!("{base}\nhealth_url = \"unix:///run/app/app.sock:/healthz\"\n");
        assert!(load(&health, &[]).is_ok());
        let other_socket = format!("{base}\nhealth_url = \"unix:///run/other.sock:/healthz\"\n");
        let e = load(&other_socket, &[]).unwrap_err();
        assert!(e.to_string().contains("same socket"), "{e}");
        assert_eq!(keys(e), vec!["app.health_url"]);
        let tcp_health = format!("{base}\nhealth_url = \"http://127.0.0.1:8080/healthz\"\n");
        assert_eq!(keys(load(&tcp_health, &[]).unwrap_err()), vec!["app.health_url"]);
        let bad = load(&base, &[("KAFKA_SIDECAR_APP__URL", "unix://app.sock:/records")]).unwrap_err();
        assert!(bad.to_string().contains("absolute socket path"), "{bad}");
        assert_eq!(keys(bad), vec!["app.url"]);
    }

    #[test]
    fn an_empty_batch_byte_limit_is_refused() {
        let toml = format!("{MINIMAL}\n[batch]\nmax_bytes = \"0B\"\n");
        assert_eq!(keys(load(&toml, &[]).unwrap_err()), vec!["batch.max_bytes"]);
    }

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(redact_url("redis://u:secret@h:6379/0"), "redis://u:<redacted>@h:6379/0");
        assert_eq!(redact_url("http://h/"), "http://h/");
    }

    fn key_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        if let toml::Value::Table(t) = value {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(path.clone());
                // Free-form maps (librdkafka properties, HTTP headers) are documented as tables.
                if !matches!(k.as_str(), "properties" | "headers") {
                    key_paths(v, &path, out);
                }
            }
        }
    }

    /// The repository as cargo names it when it runs the tests, read at run time: a build cached
    /// from a checkout at another path must still read this checkout's files.
    fn repo_root() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(
            || std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")),
            std::path::PathBuf::from,
        )
    }

    #[test]
    fn config_example_loads_and_documents_every_key() {
        let path = repo_root().join("config.toml.example");
        let loaded = Config::load_with_env(Some(&path), Vec::new());
        assert!(loaded.is_ok(), "config.toml.example must be valid: {loaded:?}");
        let example: toml::Value = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let (mut documented, mut known) = (Vec::new(), Vec::new());
        key_paths(&example, "", &mut documented);
        key_paths(&defaults, "", &mut known);
        let missing: Vec<_> = known.iter().filter(|k| !documented.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "config keys missing from config.toml.example: {missing:?}"
        );
    }

    /// Same value, allowing for different spellings of a duration or a size.
    fn same_setting(a: &toml::Value, b: &toml::Value) -> bool {
        if a == b {
            return true;
        }
        match (a.as_str(), b.as_str()) {
            (Some(x), Some(y)) => {
                let d = |t: &str| humantime::parse_duration(t).ok();
                let size = |t: &str| t.parse::<ByteSize>().ok();
                (d(x).is_some() && d(x) == d(y)) || (size(x).is_some() && size(x) == size(y))
            }
            _ => false,
        }
    }

    #[test]
    fn config_example_shows_defaults_and_marks_every_other_value_as_an_example() {
        let path = repo_root().join("config.toml.example");
        let text = std::fs::read_to_string(&path).unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut section: Vec<String> = Vec::new();
        let (mut checked, mut unmarked) = (0, Vec::new());
        for line in text.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.split('.').map(str::to_string).collect();
                continue;
            }
            let Some((key, _)) = line.split_once(" = ").filter(|_| !line.starts_with('#')) else {
                continue;
            };
            let parsed: toml::Table = toml::from_str(&line.replacen(key, "v", 1)).unwrap();
            let mut default = Some(&defaults);
            for part in section.iter().map(String::as_str).chain([key]) {
                default = default.and_then(|d| d.get(part));
            }
            let default = default.unwrap_or_else(|| panic!("{key} in [{}] is not a config key", section.join(".")));
            checked += 1;
            if !same_setting(&parsed["v"], default) && !line.contains("# example; default: ") {
                unmarked.push(format!("[{}] {line} (default: {default})", section.join(".")));
            }
        }
        assert!(checked > 60, "only {checked} settings found in the example");
        assert!(
            unmarked.is_empty(),
            "config.toml.example values that are not the default must say \"# example; default: ...\": {unmarked:#?}"
        );
    }
}
