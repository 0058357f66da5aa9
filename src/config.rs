//! Configuration: built-in defaults < TOML file < environment variables.
//!
//! Every field carries a `///` doc: it is the user documentation, mirrored in
//! `config.toml.example`. Loading reports *every* problem it finds (unknown keys,
//! wrong types, bad durations, missing required values) with the key's full path,
//! so an operator fixes a ConfigMap in one round trip.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

pub use crate::breaker::BreakerConfig;
pub use crate::dedup::DedupConfig;
pub use crate::ratelimit::RateLimitConfig;
pub use crate::telemetry::TelemetryConfig;

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
    /// Static membership id (e.g. the pod name) so restarts do not rebalance. Empty: dynamic membership.
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
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How often the finished-offset watermark is committed.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// On partition revoke: how long to wait for in-flight work of the revoked partitions before committing.
    #[serde(with = "humantime_serde")]
    pub revoke_drain_timeout: Duration,
    /// Any librdkafka consumer property, passed through verbatim (security.protocol, sasl.*, ssl.*, ...).
    /// They override the settings above. Secrets here are redacted by `check-config`.
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
    /// URL the records are POSTed to. Required.
    #[serde(deserialize_with = "lenient_string")]
    pub url: String,
    /// "single" (one record per request) or "batch" (JSON envelope, see README).
    pub mode: DeliveryMode,
    /// Timeout of one delivery request; a timeout is retried like a 5xx.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Timeout for establishing a TCP connection to the app.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Readiness gate: when set, the sidecar joins the consumer group only after a GET here
    /// answers 2xx (so it never consumes before the app can take records). Empty: no gate.
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
    #[serde(with = "humantime_serde")]
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
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap of the retry backoff (also of `Retry-After` and of outage probing).
    #[serde(with = "humantime_serde")]
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
    #[serde(with = "humantime_serde")]
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
    #[serde(with = "humantime_serde")]
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
    /// Loads defaults, then the TOML file (if any), then `KAFKA_SIDECAR_*` environment variables,
    /// and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (tests use this).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut issues = Vec::new();
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = path {
            match std::fs::read_to_string(path) {
                Ok(text) => figment = figment.merge(Toml::string(&text)),
                Err(e) => issues.push(ConfigIssue {
                    key: "--config".into(),
                    reason: format!("cannot read {}: {e}", path.display()),
                }),
            }
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        figment = figment.merge(Serialized::defaults(env_dict(&env)));

        let config = extract_sections(&figment, &mut issues);
        if let Some(config) = &config {
            config.validate(&mut issues);
        }
        match config {
            Some(config) if issues.is_empty() => Ok(config),
            _ => Err(ConfigError(issues)),
        }
    }

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
        if k.commit_interval.is_zero() {
            bad("kafka.commit_interval", "must be greater than 0");
        }
        match reqwest::Url::parse(&self.app.url) {
            _ if self.app.url.is_empty() => bad("app.url", "is required (e.g. \"http://127.0.0.1:8080/records\")"),
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            Ok(_) => bad("app.url", "must be an http:// or https:// URL"),
            Err(e) => bad("app.url", &format!("is not a valid URL: {e}")),
        }
        if !self.app.health_url.is_empty() && reqwest::Url::parse(&self.app.health_url).is_err() {
            bad("app.health_url", "is not a valid URL");
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
    }

    /// The effective configuration as TOML, with secrets replaced by `"<redacted>"`.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        for props in [&mut c.kafka.properties, &mut c.dlq.properties] {
            for (key, value) in props.iter_mut() {
                if is_secret_property(key) {
                    *value = REDACTED.into();
                }
            }
        }
        c.app.url = redact_url(&c.app.url);
        c.dedup = c.dedup.redacted();
        for (name, value) in c.app.headers.iter_mut() {
            let n = name.to_ascii_lowercase();
            if n.contains("auth") || n.contains("token") || n.contains("key") || n.contains("secret") {
                *value = REDACTED.into();
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

const REDACTED: &str = "<redacted>";

fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "sasl.oauthbearer.config",
        "sasl.username",
        "ssl.key.pem",
        "token",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// Hides the password of `scheme://user:password@host` URLs.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some(REDACTED));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// `KAFKA_SIDECAR_<SECTION>__<KEY>=value` as nested config values (see [`env_value`]);
/// librdkafka properties stay strings and
/// `_` in their names stands for `.` (`..._PROPERTIES__SASL_PASSWORD` → `sasl.password`).
fn env_dict(env: &[(String, String)]) -> Dict {
    let mut root = Dict::new();
    for (key, raw) in env {
        let Some(rest) = key.strip_prefix(ENV_PREFIX).filter(|r| r.contains("__")) else {
            continue;
        };
        let (path, value): (Vec<String>, Value) = match rest.strip_prefix("KAFKA__PROPERTIES__") {
            Some(name) => (
                vec![
                    "kafka".into(),
                    "properties".into(),
                    name.to_ascii_lowercase().replace('_', "."),
                ],
                Value::from(raw.clone()),
            ),
            None => (rest.split("__").map(str::to_ascii_lowercase).collect(), env_value(raw)),
        };
        insert_path(&mut root, &path, value);
    }
    root
}

/// Parsed like a TOML scalar or array (`7`, `true`, `[400, 422]`); string fields accept
/// numbers too (see [`lenient_string`]), so `GROUP_ID=1234` works.
fn env_value(raw: &str) -> Value {
    raw.parse().unwrap_or_else(|_| Value::from(raw.to_string()))
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    let [first, rest @ ..] = path else { return };
    if rest.is_empty() {
        dict.insert(first.clone(), value);
        return;
    }
    let child = dict.entry(first.clone()).or_insert_with(|| Value::from(Dict::new()));
    if let Value::Dict(_, d) = child {
        insert_path(d, rest, value);
    }
}

/// Extracts each section on its own so that errors in several sections are all reported.
fn extract_sections(figment: &Figment, issues: &mut Vec<ConfigIssue>) -> Option<Config> {
    // The sections are the top-level keys of the default config: no list to keep in sync.
    let sections: Vec<String> = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    };
    match figment.data() {
        Ok(data) => {
            for dict in data.values() {
                for key in dict.keys().filter(|k| !sections.contains(k)) {
                    issues.push(ConfigIssue {
                        key: key.clone(),
                        reason: format!("unknown section (expected one of: {})", sections.join(", ")),
                    });
                }
            }
        }
        Err(e) => {
            push_figment_errors(e, "", issues);
            return None;
        }
    }
    let before = issues.len();
    let config = Config {
        kafka: section(figment, "kafka", issues),
        app: section(figment, "app", issues),
        pipeline: section(figment, "pipeline", issues),
        batch: section(figment, "batch", issues),
        retry: section(figment, "retry", issues),
        dlq: section(figment, "dlq", issues),
        shutdown: section(figment, "shutdown", issues),
        admin: section(figment, "admin", issues),
        log: section(figment, "log", issues),
        telemetry: section(figment, "telemetry", issues),
        rate_limit: section(figment, "rate_limit", issues),
        breaker: section(figment, "breaker", issues),
        dedup: section(figment, "dedup", issues),
    };
    (issues.len() == before).then_some(config)
}

fn section<T: DeserializeOwned + Default>(figment: &Figment, name: &str, issues: &mut Vec<ConfigIssue>) -> T {
    figment.extract_inner(name).unwrap_or_else(|e| {
        push_figment_errors(e, name, issues);
        T::default()
    })
}

fn push_figment_errors(error: figment::Error, section: &str, issues: &mut Vec<ConfigIssue>) {
    for e in error {
        // figment lists the path innermost first.
        let mut path: Vec<String> = e.path.iter().rev().cloned().collect();
        if !section.is_empty() && path.first().map(String::as_str) != Some(section) {
            path.insert(0, section.to_string());
        }
        let reason = match &e.kind {
            figment::error::Kind::UnknownField(field, expected) => {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                format!("unknown key (expected one of: {})", expected.join(", "))
            }
            kind => kind.to_string(),
        };
        let key = if path.is_empty() {
            "config file".to_string()
        } else {
            path.join(".")
        };
        issues.push(ConfigIssue { key, reason });
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
    fn url_passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://u:secret@h:6379/0"),
            "redis://u:%3Credacted%3E@h:6379/0"
        );
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

    #[test]
    fn config_example_loads_and_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml.example");
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
}
