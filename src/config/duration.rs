//! Durations in the config: humantime text ("250ms", "30s", "5m"), bounded.
//!
//! Guarantee: every duration the config accepts can be added to `Instant::now()` (std or
//! tokio) and doubled without overflowing, so no setting can make the process panic later.
//! A longer value is rejected at load, naming its key. Every `Duration` field of every
//! section uses this module: `#[serde(with = "crate::config::duration")]`.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// The longest duration accepted: 100 years. Far beyond any sensible timeout, far below
/// what `Instant` arithmetic can hold (about 292 years of nanoseconds from boot).
pub const MAX: Duration = Duration::from_secs(3_155_760_000); // 100 × 365.25 days, as humantime counts years

/// Serializes like `humantime_serde` ("1m 30s").
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    humantime_serde::serialize(d, s)
}

/// Parses humantime text and rejects durations above [`MAX`].
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let value = humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration \"{text}\": {e} (examples: \"250ms\", \"30s\", \"5m\")"
        ))
    })?;
    check(value).map_err(serde::de::Error::custom)
}

/// `Err` with a message for a duration above [`MAX`].
pub fn check(value: Duration) -> Result<Duration, String> {
    if value > MAX {
        Err(format!(
            "duration {} is too long: at most 100 years (a longer one would overflow the clock)",
            humantime::format_duration(value)
        ))
    } else {
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        #[serde(with = "super")]
        d: Duration,
    }

    fn parse(text: &str) -> Result<Duration, String> {
        toml::from_str::<T>(&format!("d = \"{text}\""))
            .map(|t| t.d)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn sane_durations_parse_and_huge_ones_are_rejected_with_a_reason() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("100years"), Ok(MAX));
        assert!(parse("101years").is_err());
        let e = parse("1000000000 years").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        assert!(parse("5 parsecs").unwrap_err().contains("invalid duration"));
        // MAX itself is safe for the arithmetic the sidecar does.
        let now = std::time::Instant::now();
        assert!(now.checked_add(MAX * 2).is_some());
        assert!(tokio::time::Instant::now().checked_add(MAX * 2).is_some());
    }
}
