//! Retry policy, apart from transport: what an app answer means, and how long to wait.
//!
//! - 2xx: success.
//! - a configured non-retryable status (default 400, 413, 415, 422): poison, dead-letter now.
//! - any other status, a timeout, a broken connection: retry with capped exponential backoff
//!   and full jitter (honouring `Retry-After`), up to `max_attempts`, then dead-letter.
//! - 429 and 503: the app pushes back. Retried (honouring `Retry-After`) without counting
//!   attempts: an overloaded app must not push records into the DLQ.
//! - the app cannot be reached at all (connection refused, DNS): an outage. Retried without
//!   limit and never dead-lettered: an app restart must not empty a topic into the DLQ.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::config::RetryConfig;

/// What the transport observed for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// The app answered with this status.
    Status { status: u16, retry_after: Option<Duration> },
    /// The request timed out.
    Timeout,
    /// The connection could not be established (refused, unreachable, DNS).
    Unreachable(String),
    /// The request failed after connecting (reset, malformed response).
    Failed(String),
}

/// What to do with a record after one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Success,
    /// Never retry; dead-letter with this error.
    Poison(ErrorInfo),
    /// Retry after the given delay (from `Retry-After`) or the backoff; counts as an attempt.
    Retry(ErrorInfo, Option<Duration>),
    /// The app pushes back (429, 503): retry after `Retry-After` or the backoff. Not the
    /// record's fault, so not counted as an attempt and never dead-lettered.
    Busy(ErrorInfo, Option<Duration>),
    /// The app is down: wait and retry, not counted as an attempt.
    Outage(ErrorInfo),
}

/// Error class and message, as put in logs and DLQ headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// Short machine-readable class: `http_422`, `timeout`, `unreachable`, `transport`, `retries_exhausted`.
    pub class: String,
    pub message: String,
}

impl ErrorInfo {
    pub fn new(class: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            class: class.into(),
            message: message.into(),
        }
    }
}

/// Classifies one attempt. Pure: tested on its own.
pub fn classify(t: &Transport, non_retryable: &[u16]) -> Verdict {
    match t {
        Transport::Status { status, .. } if (200..300).contains(status) => Verdict::Success,
        Transport::Status { status, .. } if non_retryable.contains(status) => Verdict::Poison(ErrorInfo::new(
            format!("http_{status}"),
            format!("app rejected the record with status {status}"),
        )),
        Transport::Status {
            status: status @ (429 | 503),
            retry_after,
        } => Verdict::Busy(
            ErrorInfo::new(
                format!("http_{status}"),
                format!("app is busy or unavailable (status {status})"),
            ),
            *retry_after,
        ),
        Transport::Status { status, retry_after } => Verdict::Retry(
            ErrorInfo::new(format!("http_{status}"), format!("app answered status {status}")),
            *retry_after,
        ),
        Transport::Timeout => Verdict::Retry(ErrorInfo::new("timeout", "request to the app timed out"), None),
        Transport::Failed(e) => Verdict::Retry(ErrorInfo::new("transport", e.clone()), None),
        Transport::Unreachable(e) => Verdict::Outage(ErrorInfo::new("unreachable", e.clone())),
    }
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, step: 0 }
    }

    pub fn from_config(c: &RetryConfig) -> Self {
        Self::new(c.initial_backoff, c.max_backoff)
    }

    /// The cap for the current step: `initial * 2^step`, at most `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.step.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// A random delay in `[0, ceiling]` (full jitter, spreads retry storms), then doubles the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.step = self.step.saturating_add(1);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }

    pub fn reset(&mut self) {
        self.step = 0;
    }
}

/// The longest delay [`parse_retry_after`] returns; callers cap it further
/// (`retry.max_backoff`, `rate_limit.max_retry_after`).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Parses `Retry-After`: delay-seconds or an HTTP date. Total on any input; at most
/// [`MAX_RETRY_AFTER`], so no caller can overflow a deadline with it.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const NON_RETRYABLE: &[u16] = &[400, 413, 415, 422];

    fn status(s: u16) -> Transport {
        Transport::Status {
            status: s,
            retry_after: None,
        }
    }

    #[test]
    fn two_hundreds_are_success() {
        assert_eq!(classify(&status(200), NON_RETRYABLE), Verdict::Success);
        assert_eq!(classify(&status(204), NON_RETRYABLE), Verdict::Success);
    }

    #[test]
    fn configured_client_errors_are_poison() {
        assert!(matches!(classify(&status(422), NON_RETRYABLE), Verdict::Poison(e) if e.class == "http_422"));
        assert!(matches!(classify(&status(400), NON_RETRYABLE), Verdict::Poison(_)));
    }

    #[test]
    fn server_errors_other_client_errors_and_timeouts_are_retried() {
        for s in [500, 502, 504, 404, 409] {
            assert!(matches!(classify(&status(s), NON_RETRYABLE), Verdict::Retry(..)), "{s}");
        }
        assert!(matches!(
            classify(&Transport::Timeout, NON_RETRYABLE),
            Verdict::Retry(..)
        ));
        assert!(matches!(
            classify(&Transport::Failed("reset".into()), NON_RETRYABLE),
            Verdict::Retry(..)
        ));
    }

    #[test]
    fn push_back_is_retried_without_counting_and_honours_retry_after() {
        for status in [429, 503] {
            let t = Transport::Status {
                status,
                retry_after: Some(Duration::from_secs(1)),
            };
            assert!(matches!(classify(&t, NON_RETRYABLE), Verdict::Busy(_, Some(d)) if d == Duration::from_secs(1)));
        }
    }

    #[test]
    fn an_unreachable_app_is_an_outage_not_poison() {
        let v = classify(&Transport::Unreachable("connection refused".into()), NON_RETRYABLE);
        assert!(matches!(v, Verdict::Outage(_)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d0 = b.next_delay();
        assert!(d0 <= Duration::from_millis(100), "{d0:?}");
        assert_eq!(b.ceiling(), Duration::from_millis(200));
        let d1 = b.next_delay();
        assert!(d1 <= Duration::from_millis(200), "{d1:?}");
        for _ in 0..50 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
        assert_eq!(b.ceiling(), Duration::from_secs(1));
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let future = SystemTime::now() + Duration::from_secs(120);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("18446744073709551615"), Some(MAX_RETRY_AFTER));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1000),
            ..Default::default()
        })]

        /// Any header value: no panic, and never more than MAX_RETRY_AFTER.
        #[test]
        fn retry_after_of_any_text_is_bounded_and_never_panics(value in ".{0,40}") {
            if let Some(d) = parse_retry_after(&value) {
                proptest::prop_assert!(d <= MAX_RETRY_AFTER, "{value:?} gave {d:?}");
            }
        }

        /// Text shaped like the two valid forms (numbers of any size, dates of any year).
        #[test]
        fn retry_after_of_numbers_and_dates_is_bounded_and_never_panics(
            secs in proptest::prelude::any::<u128>(),
            day in 0u32..40, year in 0u32..100_000, hour in 0u32..100, zone in "[A-Z]{0,4}",
            weekday in proptest::sample::select(vec!["Mon", "Sun", "Xyz", ""]),
            month in proptest::sample::select(vec!["Jan", "Dec", "Feb", "Foo"]),
        ) {
            let forms = [
                secs.to_string(),
                format!(" {secs} "),
                format!("-{secs}"),
                format!("{weekday}, {day:02} {month} {year} {hour:02}:59:60 {zone}"),
                format!("{weekday}day, {day:02}-{month}-{year} {hour:02}:00:00 GMT"),
                format!("{weekday} {month} {day} {hour:02}:00:00 {year}"),
            ];
            for value in forms {
                if let Some(d) = parse_retry_after(&value) {
                    proptest::prop_assert!(d <= MAX_RETRY_AFTER, "{value:?} gave {d:?}");
                }
            }
        }
    }
}
