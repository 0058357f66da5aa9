//! `[rate_limit]` configuration (the limiter is [`crate::ratelimit`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Config section name, used in validation messages.
const SECTION: &str = "rate_limit";
/// Lowest and highest non-zero rates accepted (one permit per 1000 s, one per nanosecond).
const MIN_RATE: f64 = 0.001;
pub(crate) const MAX_RATE: f64 = 1e9;
/// `[rate_limit]`: how fast and how many deliveries may go to the app at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Records delivered per second, over all partitions (a batch counts each of its
    /// records). 0: unlimited.
    pub records_per_second: f64,
    /// Records that may start at once after a quiet period. 0: one second's worth of
    /// `records_per_second` (at least 1). Waits are timed to the millisecond, so above
    /// 1000 records/s a burst below `records_per_second / 1000` cannot reach the rate.
    pub burst: u32,
    /// Records delivered per second for one record key. 0: no per-key limit. Records
    /// without a key are not limited per key.
    pub per_key_records_per_second: f64,
    /// Burst for one record key. 0: one second's worth of `per_key_records_per_second`
    /// (at least 1).
    pub per_key_burst: u32,
    /// Most record keys with their own per-key rate state in memory (about 20 bytes each).
    /// Beyond it, records of untracked keys share one key's rate until idle keys are
    /// dropped (every second), so memory stays bounded however many distinct keys arrive.
    pub per_key_max_keys: usize,
    /// Adapt to the app: on 429 or 503 lower the number of concurrent deliveries and hold
    /// every new delivery until the app's `Retry-After`; raise it again while the app answers
    /// 2xx. Off: concurrency stays at `pipeline.workers` and only the retried record waits.
    pub adaptive: bool,
    /// Lowest number of concurrent deliveries the adaptive limit goes down to (at most
    /// `pipeline.workers`).
    pub min_concurrency: usize,
    /// On 429 or 503 the concurrency limit is multiplied by this factor (between 0 and 1).
    pub decrease_factor: f64,
    /// At most one decrease per interval: the 429s answering one wave of requests are one
    /// signal, not many.
    #[serde(with = "crate::config::duration")]
    pub decrease_interval: Duration,
    /// Longest pause of all deliveries a `Retry-After` can impose. 0: `Retry-After` only
    /// delays the record it answered.
    #[serde(with = "crate::config::duration")]
    pub max_retry_after: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            records_per_second: 0.0,
            burst: 0,
            per_key_records_per_second: 0.0,
            per_key_burst: 0,
            per_key_max_keys: 100_000,
            adaptive: true,
            min_concurrency: 1,
            decrease_factor: 0.5,
            decrease_interval: Duration::from_secs(1),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RateLimitConfig {
    /// Appends `(full key, reason)` for every invalid value.
    pub fn validate(&self, issues: &mut Vec<(String, String)>) {
        let mut bad = |key: &str, reason: &str| {
            issues.push((format!("{SECTION}.{key}"), reason.to_string()));
        };
        for (key, rate) in [
            ("records_per_second", self.records_per_second),
            ("per_key_records_per_second", self.per_key_records_per_second),
        ] {
            if !(rate == 0.0 || (MIN_RATE..=MAX_RATE).contains(&rate)) {
                bad(key, "must be 0 (unlimited) or between 0.001 and 1000000000");
            }
        }
        if self.min_concurrency == 0 {
            bad("min_concurrency", "must be at least 1");
        }
        if self.per_key_max_keys == 0 {
            bad("per_key_max_keys", "must be at least 1");
        }
        if !(self.decrease_factor > 0.0 && self.decrease_factor < 1.0) {
            bad("decrease_factor", "must be between 0 and 1 (exclusive)");
        }
    }
}
