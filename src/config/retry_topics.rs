//! `[retry_topics]` configuration: delayed retries through retry-tier topics (the tiers
//! themselves are [`crate::retry_topics`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Config section name, used in validation messages.
const SECTION: &str = "retry_topics";

/// `[retry_topics]`: non-blocking delayed retry. A record that keeps failing with a retryable
/// error leaves its lane for the next tier topic, is delivered again from there once the
/// tier's delay has passed, and goes to the DLQ after the last tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryTopicsConfig {
    /// Turn retry tiers on. Needs `dlq.topic` (the last tier's failures go there) and at
    /// least one tier. Off: failing records retry in place (`retry.max_attempts`).
    pub enabled: bool,
    /// The tiers in order, each `{ topic = "...", delay = "10s" }`, in strictly increasing
    /// delay. Each topic must exist (the sidecar subscribes to it in its own group) and be
    /// used by this consumer group only.
    pub tiers: Vec<TierConfig>,
    /// Quick in-place attempts (with `retry.*` backoff) a record read from a source topic
    /// gets before it leaves its lane for the first tier. A record read from a tier gets one
    /// attempt, then moves to the next tier.
    pub in_place_attempts: u32,
    /// Hold later records of a key while an earlier one sits in a tier. Not supported: only
    /// `false` is accepted (the README's "Retries and dead letters" says why).
    pub preserve_key_order: bool,
}

/// One retry tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// The tier's topic.
    pub topic: String,
    /// How long after a record was written to this tier it is delivered again.
    #[serde(with = "crate::config::duration")]
    pub delay: Duration,
}

impl Default for RetryTopicsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            tiers: Vec::new(),
            in_place_attempts: 3,
            preserve_key_order: false,
        }
    }
}

impl RetryTopicsConfig {
    /// Appends `(full key, reason)` for every invalid value. `sources` are `kafka.topics`,
    /// `dlq` is `dlq.topic`.
    pub fn validate(&self, sources: &[String], dlq: &str, issues: &mut Vec<(String, String)>) {
        let mut bad = |key: &str, reason: String| issues.push((format!("{SECTION}.{key}"), reason));
        if self.enabled && self.tiers.is_empty() {
            bad(
                "tiers",
                "must list at least one tier when retry_topics.enabled is true".into(),
            );
        }
        if self.enabled && dlq.trim().is_empty() {
            bad(
                "enabled",
                "needs dlq.topic: records that fail in the last tier are dead-lettered".into(),
            );
        }
        if self.in_place_attempts == 0 {
            bad("in_place_attempts", "must be at least 1".into());
        }
        if self.preserve_key_order {
            bad(
                "preserve_key_order",
                "is not supported: a record sent to a retry tier leaves its key's order (see the README, \
                 \"Retries and dead letters\"); set it to false, or turn retry_topics off to keep key order"
                    .into(),
            );
        }
        for (i, tier) in self.tiers.iter().enumerate() {
            let key = |field: &str| format!("tiers[{i}].{field}");
            let topic = tier.topic.trim();
            if topic.is_empty() {
                bad(&key("topic"), "is required".into());
            } else if sources.iter().any(|s| s == topic) {
                bad(
                    &key("topic"),
                    format!("{topic:?} is also a source topic (kafka.topics)"),
                );
            } else if topic == dlq {
                bad(
                    &key("topic"),
                    format!("{topic:?} is also the dead-letter topic (dlq.topic)"),
                );
            } else if self.tiers[..i].iter().any(|t| t.topic.trim() == topic) {
                bad(&key("topic"), format!("{topic:?} is used by an earlier tier"));
            }
            if tier.delay.is_zero() {
                bad(&key("delay"), "must be greater than 0".into());
            } else if let Some(prev) = i.checked_sub(1).and_then(|p| self.tiers.get(p)) {
                if tier.delay <= prev.delay {
                    bad(
                        &key("delay"),
                        format!(
                            "must be longer than the previous tier's delay ({}): tiers are in strictly increasing delay",
                            humantime::format_duration(prev.delay)
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(topic: &str, secs: u64) -> TierConfig {
        TierConfig {
            topic: topic.into(),
            delay: Duration::from_secs(secs),
        }
    }

    fn issues(c: &RetryTopicsConfig, dlq: &str) -> Vec<String> {
        let mut out = Vec::new();
        c.validate(&["orders".to_string()], dlq, &mut out);
        out.into_iter().map(|(k, r)| format!("{k}: {r}")).collect()
    }

    #[test]
    fn the_default_is_off_and_valid() {
        let c = RetryTopicsConfig::default();
        assert!(!c.enabled);
        assert!(issues(&c, "").is_empty());
    }

    #[test]
    fn tiers_need_increasing_delays_and_distinct_topics_each_error_naming_its_key() {
        let c = RetryTopicsConfig {
            enabled: true,
            tiers: vec![
                tier("r1", 10),
                tier("r1", 5),
                tier("orders", 60),
                tier("dead", 120),
                tier("", 0),
            ],
            in_place_attempts: 0,
            preserve_key_order: true,
        };
        let found = issues(&c, "dead");
        let expect = [
            "retry_topics.in_place_attempts: must be at least 1",
            "retry_topics.preserve_key_order: is not supported",
            "retry_topics.tiers[1].topic: \"r1\" is used by an earlier tier",
            "retry_topics.tiers[1].delay: must be longer than the previous tier's delay (10s)",
            "retry_topics.tiers[2].topic: \"orders\" is also a source topic",
            "retry_topics.tiers[3].topic: \"dead\" is also the dead-letter topic",
            "retry_topics.tiers[4].topic: is required",
            "retry_topics.tiers[4].delay: must be greater than 0",
        ];
        for e in expect {
            assert!(found.iter().any(|f| f.starts_with(e)), "missing {e:?} in {found:#?}");
        }
        assert_eq!(found.len(), expect.len(), "{found:#?}");
    }

    #[test]
    fn enabled_needs_tiers_and_a_dlq() {
        let c = RetryTopicsConfig {
            enabled: true,
            ..Default::default()
        };
        let found = issues(&c, "");
        assert!(
            found.iter().any(|f| f.starts_with("retry_topics.tiers: must list")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|f| f.starts_with("retry_topics.enabled: needs dlq.topic")),
            "{found:?}"
        );
    }
}
