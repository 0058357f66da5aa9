//! Retry tiers: where a record goes after its in-place attempts, and what a record read back
//! from a tier says about its retries.
//!
//! A record that keeps failing with a retryable error is written to the next tier topic with
//! its key, value and headers plus `x-retry-*` headers (see [`headers`]); the sidecar reads its
//! tier topics in its own consumer group and delivers each record once its not-before time has
//! come. After the last tier it goes to the DLQ with every `x-retry-*` header kept, so the dead
//! letter carries its whole history.
//!
//! Guaranteed: reading the `x-retry-*` headers back is total. A tier topic is outside data
//! (anyone may write to it): a missing or malformed header falls back to a safe default (the
//! record's own coordinates, the tier's delay from its timestamp), never panics, and a
//! not-before time is never later than the tier's delay from now, so a hostile value cannot
//! hold a partition for longer than that. Texts carried forward are bounded in length.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::RetryTopicsConfig;
use crate::record::Record;
use crate::retry::ErrorInfo;

/// Header names added to records written to a retry tier.
pub mod headers {
    /// Every retry header starts with this; they are rewritten on each move to a tier.
    pub const PREFIX: &str = "x-retry-";
    pub const SOURCE_TOPIC: &str = "x-retry-source-topic";
    pub const SOURCE_PARTITION: &str = "x-retry-source-partition";
    pub const SOURCE_OFFSET: &str = "x-retry-source-offset";
    pub const SOURCE_TIMESTAMP: &str = "x-retry-source-timestamp";
    pub const CONSUMER_GROUP: &str = "x-retry-consumer-group";
    /// The tier the record is in, 1 for the first.
    pub const TIER: &str = "x-retry-tier";
    /// Delivery attempts made so far (in place and from earlier tiers).
    pub const ATTEMPTS: &str = "x-retry-attempts";
    pub const FIRST_ERROR_CLASS: &str = "x-retry-first-error-class";
    pub const FIRST_ERROR_STATUS: &str = "x-retry-first-error-status";
    pub const FIRST_ERROR_MESSAGE: &str = "x-retry-first-error-message";
    pub const LAST_ERROR_CLASS: &str = "x-retry-last-error-class";
    pub const LAST_ERROR_STATUS: &str = "x-retry-last-error-status";
    pub const LAST_ERROR_MESSAGE: &str = "x-retry-last-error-message";
    /// Milliseconds since the epoch before which the record is not delivered again.
    pub const NOT_BEFORE: &str = "x-retry-not-before";
    /// One `tier:attempts:class:unix_ms` entry per move to a tier, comma-separated, oldest first.
    pub const HISTORY: &str = "x-retry-history";
}

/// The most bytes of a text carried from one tier to the next (messages, topic, history).
const MAX_TEXT: usize = 1024;
/// The most bytes of the history header.
const MAX_HISTORY: usize = 2048;
/// A larger attempt count read from a header is taken as this.
const MAX_ATTEMPTS: u32 = 1_000_000;

/// One tier: its topic and delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub topic: String,
    pub delay: Duration,
}

/// The configured tiers, in order.
#[derive(Debug, Clone)]
pub struct Tiers {
    tiers: Vec<Tier>,
    /// Attempts a record read from a source topic gets before it moves to the first tier.
    pub in_place_attempts: u32,
}

/// How many attempts a record gets where it is now, and where it goes when they fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub max_attempts: u32,
    /// The tier (index) a record that used its attempts goes to; `None`: the DLQ.
    pub next_tier: Option<usize>,
}

impl Tiers {
    /// `None` when `retry_topics.enabled` is off.
    pub fn from_config(c: &RetryTopicsConfig) -> Option<Arc<Self>> {
        if !c.enabled || c.tiers.is_empty() {
            return None;
        }
        Some(Arc::new(Self {
            tiers: c
                .tiers
                .iter()
                .map(|t| Tier {
                    topic: t.topic.trim().to_string(),
                    delay: t.delay,
                })
                .collect(),
            in_place_attempts: c.in_place_attempts.max(1),
        }))
    }

    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.tiers.iter().map(|t| t.topic.as_str())
    }

    pub fn all(&self) -> &[Tier] {
        &self.tiers
    }

    /// The tier (index) a topic is, if it is one.
    pub fn index_of(&self, topic: &str) -> Option<usize> {
        self.tiers.iter().position(|t| t.topic == topic)
    }

    pub fn get(&self, index: usize) -> Option<&Tier> {
        self.tiers.get(index)
    }

    /// The attempts of a record read from `topic` and the tier it goes to after them: a source
    /// record gets `in_place_attempts`, a tier record one attempt, then the next tier (after
    /// the last one the DLQ).
    pub fn pass(&self, topic: &str) -> Pass {
        match self.index_of(topic) {
            None => Pass {
                max_attempts: self.in_place_attempts,
                next_tier: Some(0),
            },
            Some(i) => Pass {
                max_attempts: 1,
                next_tier: Some(i + 1).filter(|n| *n < self.tiers.len()),
            },
        }
    }
}

/// Where a record was first read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
}

impl Origin {
    /// The record's own coordinates.
    pub fn of(r: &Record) -> Self {
        Self {
            topic: r.topic.to_string(),
            partition: r.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
        }
    }
}

/// A failure as the retry headers carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: String,
    pub message: String,
}

impl Failure {
    pub fn from_error(e: &ErrorInfo) -> Self {
        Self {
            class: truncate(&e.class, MAX_TEXT).to_string(),
            message: truncate(&e.message, MAX_TEXT).to_string(),
        }
    }

    /// The HTTP status in a class `http_NNN`.
    pub fn status(&self) -> Option<u16> {
        self.class.strip_prefix("http_")?.parse().ok()
    }
}

/// What a record read from a tier says about its retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryInfo {
    /// The tier it was read from (index; 0 is the first tier).
    pub tier: usize,
    /// Attempts made before it was written to this tier.
    pub prior_attempts: u32,
    pub origin: Origin,
    /// The first failure of all (`None` when the header is missing).
    pub first: Option<Failure>,
    /// The history header, bounded.
    pub history: String,
}

impl RetryInfo {
    /// Reads the retry headers of a record read from tier `tier`. Total: see the module doc.
    pub fn read(r: &Record, tier: usize) -> Self {
        let text = |name: &str| r.header_str(name).map(|s| truncate(s, MAX_TEXT).to_string());
        let number = |name: &str| r.header_str(name).and_then(|s| s.trim().parse::<i64>().ok());
        let origin = match (
            text(headers::SOURCE_TOPIC).filter(|t| !t.is_empty()),
            number(headers::SOURCE_PARTITION).and_then(|p| i32::try_from(p).ok()),
            number(headers::SOURCE_OFFSET),
        ) {
            (Some(topic), Some(partition), Some(offset)) => Origin {
                topic,
                partition,
                offset,
                timestamp_ms: number(headers::SOURCE_TIMESTAMP),
            },
            // Half a set of coordinates is no coordinates: use the tier record's own.
            _ => Origin::of(r),
        };
        let prior_attempts = number(headers::ATTEMPTS)
            .and_then(|a| u32::try_from(a).ok())
            .map_or(tier as u32 + 1, |a| a.min(MAX_ATTEMPTS));
        let first = text(headers::FIRST_ERROR_CLASS).map(|class| Failure {
            class,
            message: text(headers::FIRST_ERROR_MESSAGE).unwrap_or_default(),
        });
        Self {
            tier,
            prior_attempts,
            origin,
            first,
            history: r
                .header_str(headers::HISTORY)
                .map(|h| tail(h, MAX_HISTORY).to_string())
                .unwrap_or_default(),
        }
    }
}

/// When a record read from a tier with this delay may be delivered, in milliseconds since
/// the epoch: its `x-retry-not-before`, else its timestamp plus the delay, else now; never
/// later than `now + delay`.
pub fn not_before(r: &Record, delay: Duration, now_ms: i64) -> i64 {
    let delay_ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    let latest = now_ms.saturating_add(delay_ms);
    let parsed = r
        .header_str(headers::NOT_BEFORE)
        .and_then(|s| s.trim().parse::<i64>().ok());
    let due = parsed
        .or_else(|| r.timestamp_ms.map(|t| t.saturating_add(delay_ms)))
        .unwrap_or(now_ms);
    due.min(latest)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A move of a record to a tier: everything its `x-retry-*` headers say.
#[derive(Debug, Clone)]
pub struct Move<'a> {
    pub origin: &'a Origin,
    /// The tier it goes to (index).
    pub tier: usize,
    /// Attempts made so far, this one included.
    pub attempts: u32,
    pub first: &'a Failure,
    pub last: &'a Failure,
    pub not_before_ms: i64,
    pub group: &'a str,
    /// The history so far (from the tier it was read from; empty for a source record).
    pub history: &'a str,
    pub now_ms: i64,
}

impl Move<'_> {
    /// The `x-retry-*` headers of the record written to the tier.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let status = |f: &Failure| f.status().map(|s| s.to_string()).unwrap_or_default();
        let entry = format!(
            "{}:{}:{}:{}",
            self.tier + 1,
            self.attempts,
            self.last.class,
            self.now_ms
        );
        let history = match self.history.is_empty() {
            true => entry,
            false => format!("{},{entry}", self.history),
        };
        vec![
            (headers::SOURCE_TOPIC, self.origin.topic.clone()),
            (headers::SOURCE_PARTITION, self.origin.partition.to_string()),
            (headers::SOURCE_OFFSET, self.origin.offset.to_string()),
            (
                headers::SOURCE_TIMESTAMP,
                self.origin.timestamp_ms.map(|t| t.to_string()).unwrap_or_default(),
            ),
            (headers::CONSUMER_GROUP, self.group.to_string()),
            (headers::TIER, (self.tier + 1).to_string()),
            (headers::ATTEMPTS, self.attempts.to_string()),
            (headers::FIRST_ERROR_CLASS, self.first.class.clone()),
            (headers::FIRST_ERROR_STATUS, status(self.first)),
            (headers::FIRST_ERROR_MESSAGE, self.first.message.clone()),
            (headers::LAST_ERROR_CLASS, self.last.class.clone()),
            (headers::LAST_ERROR_STATUS, status(self.last)),
            (headers::LAST_ERROR_MESSAGE, self.last.message.clone()),
            (headers::NOT_BEFORE, self.not_before_ms.to_string()),
            (headers::HISTORY, tail(&history, MAX_HISTORY).to_string()),
        ]
    }
}

/// Whether a header name is one of the retry headers (rewritten on every move).
pub fn is_retry_header(name: &[u8]) -> bool {
    name.len() >= headers::PREFIX.len()
        && name[..headers::PREFIX.len()].eq_ignore_ascii_case(headers::PREFIX.as_bytes())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The longest suffix of `s` of at most `max` bytes that starts on a character boundary.
fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::config::TierConfig;

    fn tiers() -> Arc<Tiers> {
        let c = RetryTopicsConfig {
            enabled: true,
            tiers: vec![
                TierConfig {
                    topic: "t-10s".into(),
                    delay: Duration::from_secs(10),
                },
                TierConfig {
                    topic: "t-1m".into(),
                    delay: Duration::from_secs(60),
                },
            ],
            in_place_attempts: 2,
            preserve_key_order: false,
        };
        Tiers::from_config(&c).expect("enabled")
    }

    fn record(topic: &str, headers: Vec<(&[u8], Option<&[u8]>)>) -> Record {
        Record {
            topic: topic.into(),
            partition: 3,
            offset: 42,
            timestamp_ms: Some(1_000_000),
            key: None,
            value: None,
            headers: headers
                .into_iter()
                .map(|(k, v)| (Bytes::copy_from_slice(k), v.map(Bytes::copy_from_slice)))
                .collect(),
            generation: 1,
        }
    }

    #[test]
    fn a_source_record_goes_to_the_first_tier_and_each_tier_to_the_next_then_the_dlq() {
        let t = tiers();
        assert_eq!(
            t.pass("orders"),
            Pass {
                max_attempts: 2,
                next_tier: Some(0)
            }
        );
        assert_eq!(
            t.pass("t-10s"),
            Pass {
                max_attempts: 1,
                next_tier: Some(1)
            }
        );
        assert_eq!(
            t.pass("t-1m"),
            Pass {
                max_attempts: 1,
                next_tier: None
            }
        );
        assert!(Tiers::from_config(&RetryTopicsConfig::default()).is_none());
    }

    #[test]
    fn the_headers_written_on_a_move_read_back_the_same() {
        let origin = Origin {
            topic: "orders".into(),
            partition: 7,
            offset: 99,
            timestamp_ms: Some(5),
        };
        let first = Failure::from_error(&ErrorInfo::new("http_500", "app answered status 500"));
        let last = Failure::from_error(&ErrorInfo::new("timeout", "timed out"));
        let m = Move {
            origin: &origin,
            tier: 1,
            attempts: 3,
            first: &first,
            last: &last,
            not_before_ms: 2_000_000,
            group: "g",
            history: "1:2:http_500:10",
            now_ms: 20,
        };
        let hs = m.headers();
        let owned: Vec<(Vec<u8>, Option<Vec<u8>>)> = hs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec())))
            .collect();
        let r = record(
            "t-1m",
            owned.iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect(),
        );
        let info = RetryInfo::read(&r, 1);
        assert_eq!(info.origin, origin);
        assert_eq!(info.prior_attempts, 3);
        assert_eq!(info.first, Some(first.clone()));
        assert_eq!(info.history, "1:2:http_500:10,2:3:timeout:20");
        assert_eq!(r.header_str(headers::FIRST_ERROR_STATUS), Some("500"));
        assert_eq!(r.header_str(headers::LAST_ERROR_STATUS), Some(""));
        assert_eq!(r.header_str(headers::TIER), Some("2"));
        // Not yet due, and a far-off value is capped at the tier's delay from now.
        assert_eq!(not_before(&r, Duration::from_secs(60), 1_990_000), 2_000_000);
        assert_eq!(not_before(&r, Duration::from_secs(60), 0), 60_000);
    }

    #[test]
    fn malformed_retry_headers_fall_back_to_safe_values_without_panicking() {
        let long = "é".repeat(5000);
        let nasty: &[&[u8]] = &[
            b"",
            b"\xff\xfe\x00",
            b"-1",
            b"99999999999999999999999999",
            b"NaN",
            b" 12 ",
            long.as_bytes(),
        ];
        for v in nasty {
            let names = [
                headers::SOURCE_TOPIC,
                headers::SOURCE_PARTITION,
                headers::SOURCE_OFFSET,
                headers::SOURCE_TIMESTAMP,
                headers::ATTEMPTS,
                headers::FIRST_ERROR_CLASS,
                headers::FIRST_ERROR_MESSAGE,
                headers::NOT_BEFORE,
                headers::HISTORY,
            ];
            let hs: Vec<(&[u8], Option<&[u8]>)> = names.iter().map(|n| (n.as_bytes(), Some(*v))).collect();
            let mut r = record("t-10s", hs);
            r.headers.push((Bytes::from_static(b"\xff"), None));
            let info = RetryInfo::read(&r, 0);
            assert!(info.origin.topic.len() <= MAX_TEXT && info.history.len() <= MAX_HISTORY);
            assert!(info.prior_attempts <= MAX_ATTEMPTS);
            if *v == b" 12 " {
                assert_eq!((info.origin.partition, info.origin.offset), (12, 12), "{v:?}");
            } else if std::str::from_utf8(v).map_or(true, |s| s.trim().parse::<i32>().is_err()) {
                // Only a full, parseable set of coordinates is taken.
                assert_eq!(info.origin, Origin::of(&r), "{v:?}");
            }
            let now = 10_000_000;
            let due = not_before(&r, Duration::from_secs(10), now);
            assert!(due <= now + 10_000, "{v:?}: {due}");
        }
        let bare = record("t-10s", vec![]);
        let info = RetryInfo::read(&bare, 1);
        assert_eq!(info.origin, Origin::of(&bare));
        assert_eq!(info.prior_attempts, 2, "at least one attempt per tier passed");
        assert_eq!(info.first, None);
        assert_eq!(
            not_before(&bare, Duration::from_secs(10), 1_005_000),
            1_010_000,
            "timestamp + delay"
        );
        assert!(is_retry_header(b"X-Retry-Tier") && !is_retry_header(b"x-retr") && !is_retry_header(b"\xff"));
        assert_eq!(tail("aé", 1), "");
        assert_eq!(truncate("héllo", 2), "h");
    }
}
