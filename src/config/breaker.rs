//! `[breaker]` configuration (the circuit breaker is [`crate::breaker`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Config section name, used in validation messages.
const SECTION: &str = "breaker";
/// `[breaker]`: when to stop calling an app that is down, and how to find out it is back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Turn the circuit breaker on. Off: deliveries are always attempted (an unreachable
    /// app is still never dead-lettered, its records are retried).
    pub enabled: bool,
    /// Failures are counted over this sliding window.
    #[serde(with = "crate::config::duration")]
    pub window: Duration,
    /// Fewest outcomes in the window before the breaker may open, so that a few failures
    /// on a quiet topic do not stop it.
    pub min_requests: u32,
    /// Share of failures in the window (above 0, at most 1) at which the breaker opens.
    pub failure_ratio: f64,
    /// How long the breaker stays open before one probe delivery is let through.
    #[serde(with = "crate::config::duration")]
    pub cool_down: Duration,
    /// Each failed probe doubles the cool-down, up to this.
    #[serde(with = "crate::config::duration")]
    pub max_cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            window: Duration::from_secs(10),
            min_requests: 20,
            failure_ratio: 0.5,
            cool_down: Duration::from_secs(5),
            max_cool_down: Duration::from_secs(60),
        }
    }
}

impl BreakerConfig {
    /// Appends `(full key, reason)` for every invalid value.
    pub fn validate(&self, issues: &mut Vec<(String, String)>) {
        let mut bad = |key: &str, reason: &str| {
            issues.push((format!("{SECTION}.{key}"), reason.to_string()));
        };
        if self.window.is_zero() {
            bad("window", "must be greater than 0");
        }
        if self.min_requests == 0 {
            bad("min_requests", "must be at least 1");
        }
        if !(self.failure_ratio > 0.0 && self.failure_ratio <= 1.0) {
            bad("failure_ratio", "must be greater than 0 and at most 1");
        }
        if self.cool_down.is_zero() {
            bad("cool_down", "must be greater than 0");
        }
        if self.max_cool_down < self.cool_down {
            bad("max_cool_down", "must be at least breaker.cool_down");
        }
    }
}
