//! `[dedup]` configuration (dedup itself is [`crate::dedup`]).

use std::time::Duration;

use redis::IntoConnectionInfo;
use serde::{Deserialize, Serialize};

use super::{lenient_string, redact_url, string_or_list};

/// Config section name, used in validation messages.
const SECTION: &str = "dedup";

/// Where a record's idempotency key comes from (`dedup.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `{topic}/{partition}/{offset}/{timestamp}` (see [`crate::dedup::derive_key`]).
    Offset,
    /// The record key.
    Key,
    /// Hex SHA-256 of the record value.
    ValueHash,
    /// The value of the first record header with this name.
    Header(String),
}

impl KeySource {
    /// Parses "offset", "key", "value_hash" or `"header:<name>"`.
    pub fn parse(s: &str) -> Option<KeySource> {
        match s {
            "offset" => Some(KeySource::Offset),
            "key" => Some(KeySource::Key),
            "value_hash" => Some(KeySource::ValueHash),
            _ => s
                .strip_prefix("header:")
                .filter(|name| !name.is_empty())
                .map(|name| KeySource::Header(name.to_string())),
        }
    }
}

/// What to do with records while Redis is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Stop delivering and retry Redis with backoff: no loss, no duplicate.
    Pause,
    /// Deliver without dedup (counted and logged): no loss, duplicates possible.
    Deliver,
}

/// `[dedup]`: skip records whose idempotency key was already delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Turn dedup on. Off: every record read is delivered (at-least-once).
    pub enabled: bool,
    /// Redis URL: `redis://host:6379/0`, `rediss://host:6380/0` (TLS), with a password
    /// `redis://:password@host:6379/0` (or `redis://user:password@...` with ACL users).
    /// Empty, and no `cluster_urls`: the embedded in-memory store, which dedups within this
    /// process only (for running one sidecar locally, not for replicas).
    #[serde(deserialize_with = "lenient_string")]
    pub redis_url: String,
    /// Redis Cluster seed nodes (`redis://` or `rediss://`, the password in the URLs). Not
    /// empty: cluster mode, and `redis_url` must be empty. A comma-separated string works too.
    #[serde(deserialize_with = "string_or_list")]
    pub cluster_urls: Vec<String>,
    /// PEM file with the CA certificate(s) that signed the server certificate of a
    /// `rediss://` `redis_url`. Empty: the system trust store (which also honours
    /// `SSL_CERT_FILE`). Cluster mode always uses the system trust store.
    #[serde(deserialize_with = "lenient_string")]
    pub tls_ca_file: String,
    /// Where the idempotency key comes from: "offset" (topic/partition/offset/timestamp: catches
    /// redelivery after a crash or rebalance), "key" (the record key), "value_hash" (SHA-256
    /// of the value) or `"header:<name>"` (a record header, e.g. "header:idempotency-key").
    /// A record without that key, value or header falls back to its offset (counted).
    #[serde(deserialize_with = "lenient_string")]
    pub key: String,
    /// How long a claim ("delivery in progress") lasts. A consumer that dies mid-delivery
    /// holds the key at most this long; a longer delivery keeps it by claiming again.
    #[serde(with = "crate::config::duration")]
    pub lease_ttl: Duration,
    /// How long a key stays done after its record was delivered: the dedup window.
    #[serde(with = "crate::config::duration")]
    pub done_ttl: Duration,
    /// While Redis is unavailable: "pause" (stop delivering, retry Redis with backoff: no
    /// loss, no duplicate) or "deliver" (deliver without dedup, counted and logged).
    pub on_error: OnError,
    /// Bound of one Redis operation on a batch, reconnecting included; past it the operation
    /// fails as "redis unavailable".
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// Most keys the embedded in-memory store holds; beyond it expired keys go first, then
    /// the ones closest to expiry.
    pub memory_max_entries: usize,
    /// First part of every key: `{prefix}:{group}:{idempotency key}`.
    #[serde(deserialize_with = "lenient_string")]
    pub prefix: String,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            redis_url: String::new(),
            cluster_urls: Vec::new(),
            tls_ca_file: String::new(),
            key: "offset".into(),
            lease_ttl: Duration::from_secs(60),
            done_ttl: Duration::from_secs(24 * 60 * 60),
            on_error: OnError::Pause,
            timeout: Duration::from_secs(2),
            memory_max_entries: 100_000,
            prefix: "kafka-sidecar".into(),
        }
    }
}

impl DedupConfig {
    /// Appends `(full key, reason)` for every invalid value.
    pub fn validate(&self, issues: &mut Vec<(String, String)>) {
        let mut bad = |key: &str, reason: &str| {
            issues.push((format!("{SECTION}.{key}"), reason.to_string()));
        };
        if KeySource::parse(&self.key).is_none() {
            bad(
                "key",
                "must be \"offset\", \"key\", \"value_hash\" or \"header:<name>\"",
            );
        }
        if !self.redis_url.is_empty() && !is_redis_url(&self.redis_url) {
            bad(
                "redis_url",
                "must be a redis:// or rediss:// URL (e.g. \"redis://:password@host:6379/0\")",
            );
        }
        if !self.cluster_urls.is_empty() && !self.redis_url.is_empty() {
            bad(
                "cluster_urls",
                "set either dedup.redis_url or dedup.cluster_urls, not both",
            );
        }
        for (i, url) in self.cluster_urls.iter().enumerate() {
            if !is_redis_url(url) {
                bad(&format!("cluster_urls[{i}]"), "must be a redis:// or rediss:// URL");
            }
        }
        let tls = self.cluster_urls.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls != 0 && tls != self.cluster_urls.len() {
            bad("cluster_urls", "must all be redis:// or all rediss://");
        }
        if !self.tls_ca_file.is_empty() {
            if !self.cluster_urls.is_empty() {
                bad(
                    "tls_ca_file",
                    "is not supported with dedup.cluster_urls: add the CA to the system trust store (or SSL_CERT_FILE)",
                );
            } else if !self.redis_url.starts_with("rediss://") {
                bad("tls_ca_file", "needs a rediss:// dedup.redis_url");
            }
        }
        if self.lease_ttl < Duration::from_millis(100) {
            bad("lease_ttl", "must be at least 100ms");
        }
        if self.done_ttl < self.lease_ttl {
            bad("done_ttl", "must be at least dedup.lease_ttl");
        }
        if self.timeout.is_zero() {
            bad("timeout", "must be greater than 0");
        }
        if self.memory_max_entries == 0 {
            bad("memory_max_entries", "must be at least 1");
        }
        if self.prefix.is_empty() || self.prefix.chars().any(char::is_whitespace) {
            bad("prefix", "must be non-empty, without spaces");
        }
    }

    /// This config with passwords in the Redis URLs replaced by `<redacted>` (for
    /// `check-config` and logs).
    pub fn redacted(&self) -> DedupConfig {
        DedupConfig {
            redis_url: redact_url(&self.redis_url),
            cluster_urls: self.cluster_urls.iter().map(|u| redact_url(u)).collect(),
            ..self.clone()
        }
    }

    /// The configured key source; [`KeySource::Offset`] when `key` is invalid (which
    /// [`DedupConfig::validate`] reports).
    pub fn key_source(&self) -> KeySource {
        KeySource::parse(&self.key).unwrap_or(KeySource::Offset)
    }
}

fn is_redis_url(url: &str) -> bool {
    (url.starts_with("redis://") || url.starts_with("rediss://")) && url.into_connection_info().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(cfg: &DedupConfig) -> Vec<String> {
        let mut issues = Vec::new();
        cfg.validate(&mut issues);
        issues.into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let d = DedupConfig::default();
        assert!(keys(&d).is_empty(), "{:?}", keys(&d));
        assert!(!d.enabled);
        assert_eq!(d.key, "offset");
        assert_eq!(d.key_source(), KeySource::Offset);
        assert_eq!(d.lease_ttl, Duration::from_secs(60));
        assert_eq!(d.done_ttl, Duration::from_secs(86_400));
        assert_eq!(d.on_error, OnError::Pause);
        assert_eq!(d.memory_max_entries, 100_000);
        assert_eq!(d.prefix, "kafka-sidecar");
        assert!(d.redis_url.is_empty() && d.cluster_urls.is_empty());
    }

    #[test]
    fn validate_names_full_keys() {
        let bad = DedupConfig {
            redis_url: "http://h:6379".into(),
            key: "header:".into(),
            lease_ttl: Duration::from_millis(10),
            done_ttl: Duration::from_millis(5),
            timeout: Duration::ZERO,
            memory_max_entries: 0,
            prefix: "a b".into(),
            ..DedupConfig::default()
        };
        assert_eq!(
            keys(&bad),
            [
                "dedup.key",
                "dedup.redis_url",
                "dedup.lease_ttl",
                "dedup.done_ttl",
                "dedup.timeout",
                "dedup.memory_max_entries",
                "dedup.prefix"
            ]
        );
    }

    #[test]
    fn redis_url_and_cluster_urls_exclude_each_other_and_must_be_redis_urls() {
        let both = DedupConfig {
            redis_url: "redis://a:6379".into(),
            cluster_urls: vec!["redis://b:7000".into(), "rediss://c:7001".into(), "c:7002".into()],
            ..DedupConfig::default()
        };
        assert_eq!(
            keys(&both),
            ["dedup.cluster_urls", "dedup.cluster_urls[2]", "dedup.cluster_urls"]
        );
        let good = DedupConfig {
            cluster_urls: vec!["redis://:pw@b:7000".into(), "redis://c:7001".into()],
            ..DedupConfig::default()
        };
        assert!(keys(&good).is_empty(), "{:?}", keys(&good));
        for url in [
            "redis://:pw@h:6379/0",
            "rediss://h:6380",
            "redis://user:pw@h",
            "rediss://h/#insecure",
        ] {
            let c = DedupConfig {
                redis_url: url.into(),
                ..DedupConfig::default()
            };
            assert!(keys(&c).is_empty(), "{url}: {:?}", keys(&c));
        }
    }

    #[test]
    fn a_ca_file_needs_a_standalone_rediss_url() {
        let plain = DedupConfig {
            redis_url: "redis://h:6379".into(),
            tls_ca_file: "/etc/ca.pem".into(),
            ..DedupConfig::default()
        };
        assert_eq!(keys(&plain), ["dedup.tls_ca_file"]);
        let cluster = DedupConfig {
            cluster_urls: vec!["rediss://h:7000".into()],
            tls_ca_file: "/etc/ca.pem".into(),
            ..DedupConfig::default()
        };
        assert_eq!(keys(&cluster), ["dedup.tls_ca_file"]);
        let tls = DedupConfig {
            redis_url: "rediss://h:6380".into(),
            tls_ca_file: "/etc/ca.pem".into(),
            ..DedupConfig::default()
        };
        assert!(keys(&tls).is_empty());
    }

    #[test]
    fn config_reads_from_toml_with_durations_and_a_comma_separated_cluster_list() {
        let c: DedupConfig = toml::from_str(
            "enabled = true\nkey = \"header:idempotency-key\"\nlease_ttl = \"10s\"\ndone_ttl = \"1h\"\n\
             on_error = \"deliver\"\ncluster_urls = \"redis://a:7000, redis://b:7001\"\nprefix = 1234",
        )
        .unwrap();
        assert!(c.enabled);
        assert_eq!(c.key_source(), KeySource::Header("idempotency-key".into()));
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.done_ttl, Duration::from_secs(3600));
        assert_eq!(c.on_error, OnError::Deliver);
        assert_eq!(c.cluster_urls, ["redis://a:7000", "redis://b:7001"]);
        assert_eq!(c.prefix, "1234");
        assert_eq!(c.timeout, Duration::from_secs(2), "unset fields keep their default");
        let list: DedupConfig = toml::from_str("cluster_urls = [\"redis://a:7000\"]").unwrap();
        assert_eq!(list.cluster_urls, ["redis://a:7000"]);
        assert!(toml::from_str::<DedupConfig>("redis_uri = \"redis://h\"").is_err());
        assert!(toml::from_str::<DedupConfig>("on_error = \"skip\"").is_err());
    }

    #[test]
    fn redacted_hides_passwords_in_every_url() {
        let c = DedupConfig {
            redis_url: "redis://:s3cret@h:6379/0".into(),
            cluster_urls: vec!["rediss://user:s3cret@c:7000".into()],
            ..DedupConfig::default()
        };
        let shown = toml::to_string(&c.redacted()).unwrap();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
        assert_eq!(c.redacted().prefix, c.prefix);
    }
}
