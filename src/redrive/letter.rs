//! A dead letter as the redrive commands see it: the `x-dlq-*` headers decoded totally.
//!
//! Every header is outside data. A header that is missing, null, not UTF-8 or not a number
//! reads as absent (`None`); nothing here panics on any bytes. When a name occurs more than
//! once the **last** occurrence counts: the DLQ producer appends its `x-dlq-*` headers after
//! the record's own, so the last one is the newest.

use bytes::Bytes;

use crate::dlq::headers;
use crate::record::Record;

/// Set on a replayed record: the dead letter it came from, as `TOPIC/PARTITION/OFFSET`.
pub const REPLAYED_FROM: &str = "x-dlq-replayed-from";
/// Set on a replayed record: how many times it has been replayed, this replay included.
pub const REPLAY_COUNT: &str = "x-dlq-replay-count";
/// Every header the sidecar adds to a dead letter or a replayed record starts with this.
pub const PREFIX: &[u8] = b"x-dlq-";

/// How many times a dead letter was replayed before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayCount {
    /// No `x-dlq-replay-count` header: never replayed.
    Never,
    /// Replayed this many times.
    Times(u32),
    /// The header is there but is not a number (garbage, not UTF-8, null).
    Invalid,
}

impl ReplayCount {
    /// Times replayed; `None` when the header is garbage.
    pub fn times(self) -> Option<u32> {
        match self {
            ReplayCount::Never => Some(0),
            ReplayCount::Times(n) => Some(n),
            ReplayCount::Invalid => None,
        }
    }
}

/// The redrive view of a DLQ record.
#[derive(Debug, Clone)]
pub struct Letter {
    pub source_topic: Option<Bytes>,
    pub source_partition: Option<Bytes>,
    pub source_offset: Option<Bytes>,
    pub consumer_group: Option<Bytes>,
    pub attempts: Option<Bytes>,
    pub error_class: Option<Bytes>,
    /// `x-dlq-dropped` is there: the dead letter lacks its value (or key and headers).
    pub dropped: bool,
    pub replay_count: ReplayCount,
}

impl Letter {
    pub fn from_record(r: &Record) -> Self {
        let count = match find(r, REPLAY_COUNT) {
            None => ReplayCount::Never,
            Some(h) => h
                .and_then(|v| parse::<u32>(Some(v)))
                .map_or(ReplayCount::Invalid, ReplayCount::Times),
        };
        Self {
            source_topic: value(r, headers::SOURCE_TOPIC),
            source_partition: value(r, headers::SOURCE_PARTITION),
            source_offset: value(r, headers::SOURCE_OFFSET),
            consumer_group: value(r, headers::CONSUMER_GROUP),
            attempts: value(r, headers::ATTEMPTS),
            error_class: value(r, headers::ERROR_CLASS),
            dropped: find(r, headers::DROPPED).is_some(),
            replay_count: count,
        }
    }

    /// The source topic, when the header holds a valid topic name.
    pub fn topic(&self) -> Option<&str> {
        utf8(self.source_topic.as_ref()).filter(|t| is_topic_name(t))
    }

    /// The source partition, when the header holds a partition number.
    pub fn partition(&self) -> Option<i32> {
        parse::<i32>(self.source_partition.as_ref()).filter(|p| *p >= 0)
    }

    pub fn offset(&self) -> Option<i64> {
        parse::<i64>(self.source_offset.as_ref()).filter(|o| *o >= 0)
    }

    pub fn attempts(&self) -> Option<u32> {
        parse::<u32>(self.attempts.as_ref())
    }

    /// The error class as UTF-8 (`None` when missing or not UTF-8).
    pub fn class(&self) -> Option<&str> {
        utf8(self.error_class.as_ref())
    }

    /// The app's HTTP status, from an error class `http_NNN`.
    pub fn status(&self) -> Option<u16> {
        self.class()
            .and_then(|c| c.strip_prefix("http_"))
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|s| (100..=999).contains(s))
    }

    pub fn group(&self) -> Option<&str> {
        utf8(self.consumer_group.as_ref())
    }

    /// `TOPIC/PARTITION/OFFSET` of the source record, escaped for display (`-` for missing parts).
    pub fn source_display(&self) -> String {
        let part = |v: Option<&Bytes>| v.map_or_else(|| "-".to_string(), |b| escape(b, 200));
        format!(
            "{}/{}/{}",
            part(self.source_topic.as_ref()),
            part(self.source_partition.as_ref()),
            part(self.source_offset.as_ref())
        )
    }
}

/// The last header named `name`: `None` when absent, `Some(None)` when its value is null.
fn find<'a>(r: &'a Record, name: &str) -> Option<Option<&'a Bytes>> {
    r.headers
        .iter()
        .rev()
        .find(|(k, _)| k.as_ref() == name.as_bytes())
        .map(|(_, v)| v.as_ref())
}

/// The last header named `name` with a value (null reads as absent).
fn value(r: &Record, name: &str) -> Option<Bytes> {
    find(r, name).flatten().cloned()
}

fn utf8(v: Option<&Bytes>) -> Option<&str> {
    v.and_then(|b| std::str::from_utf8(b).ok())
}

fn parse<T: std::str::FromStr>(v: Option<&Bytes>) -> Option<T> {
    utf8(v).and_then(|s| s.trim().parse::<T>().ok())
}

/// Whether `name` is a topic name Kafka accepts: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn is_topic_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// At most the first `max` bytes of `bytes` as text safe for a terminal: printable ASCII as
/// is, `\\` doubled, `\n` `\r` `\t` as escapes, printable non-ASCII characters as is,
/// control, format and bidi characters as `\u{…}`, bytes that are not UTF-8 as `\xNN`, and
/// `...` when cut.
pub fn escape(bytes: &[u8], max: usize) -> String {
    use std::fmt::Write;
    let cut = bytes.len() > max;
    let head = bytes.get(..max.min(bytes.len())).unwrap_or(bytes);
    let mut out = String::with_capacity(head.len() + 8);
    for chunk in head.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                ' '..='~' => out.push(c),
                c if c.is_ascii() || c.is_control() || is_invisible(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    if cut {
        out.push_str("...");
    }
    out
}

/// Format characters that change how a terminal shows the text around them: zero-width
/// characters, bidi overrides and isolates, the BOM, and the line and paragraph separators.
fn is_invisible(c: char) -> bool {
    matches!(u32::from(c), 0x00ad | 0x061c | 0x180e | 0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x206f | 0xfeff)
}

/// A point in time given on the command line: RFC 3339 (`2026-12-06T03:00:00Z`) or a
/// duration ago (`90m`, `2h`). Milliseconds since the epoch.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s.trim()) {
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| format!("{s:?} is before 1970"))?
            .as_millis();
        return i64::try_from(ms).map_err(|_| format!("{s:?} is too far in the future"));
    }
    if let Ok(ago) = humantime::parse_duration(s.trim()) {
        let ago = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms.saturating_sub(ago));
    }
    Err(format!(
        "{:?} is neither an RFC 3339 time (2026-12-06T03:00:00Z) nor a duration ago (90m, 2h)",
        escape(s.as_bytes(), 100)
    ))
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One `--filter KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    ErrorClass(String),
    Status(u16),
    SourceTopic(String),
    ConsumerGroup(String),
}

/// The keys `--filter` knows.
pub const FILTER_KEYS: &str = "error_class, status, source_topic, consumer_group";

impl Filter {
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some((key, value)) = s.split_once('=') else {
            return Err(format!("--filter {:?}: expected KEY=VALUE", escape(s.as_bytes(), 100)));
        };
        let v = value.to_string();
        match key.trim() {
            "error_class" => Ok(Filter::ErrorClass(v)),
            "status" => value
                .trim()
                .parse::<u16>()
                .map(Filter::Status)
                .map_err(|_| format!("--filter status={value:?}: not an HTTP status")),
            "source_topic" => Ok(Filter::SourceTopic(v)),
            "consumer_group" => Ok(Filter::ConsumerGroup(v)),
            other => Err(format!(
                "--filter: unknown key {:?} (known: {FILTER_KEYS})",
                escape(other.as_bytes(), 100)
            )),
        }
    }

    pub fn matches(&self, l: &Letter) -> bool {
        match self {
            Filter::ErrorClass(c) => l.class() == Some(c.as_str()),
            Filter::Status(s) => l.status() == Some(*s),
            Filter::SourceTopic(t) => utf8(l.source_topic.as_ref()) == Some(t.as_str()),
            Filter::ConsumerGroup(g) => l.group() == Some(g.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn record(headers: Vec<(&[u8], Option<&[u8]>)>) -> Record {
        Record {
            topic: Arc::from("dlq"),
            partition: 0,
            offset: 7,
            timestamp_ms: Some(1),
            key: None,
            value: None,
            headers: headers
                .into_iter()
                .map(|(k, v)| (Bytes::copy_from_slice(k), v.map(Bytes::copy_from_slice)))
                .collect(),
            generation: 0,
        }
    }

    #[test]
    fn a_complete_dead_letter_decodes_every_field() {
        let r = record(vec![
            (b"x-dlq-source-topic", Some(b"orders")),
            (b"x-dlq-source-partition", Some(b"3")),
            (b"x-dlq-source-offset", Some(b"42")),
            (b"x-dlq-attempts", Some(b"5")),
            (b"x-dlq-error-class", Some(b"http_422")),
            (b"x-dlq-consumer-group", Some(b"g")),
            (b"x-dlq-replay-count", Some(b"2")),
        ]);
        let l = Letter::from_record(&r);
        assert_eq!(l.topic(), Some("orders"));
        assert_eq!((l.partition(), l.offset(), l.attempts()), (Some(3), Some(42), Some(5)));
        assert_eq!(
            (l.class(), l.status(), l.group()),
            (Some("http_422"), Some(422), Some("g"))
        );
        assert_eq!(l.replay_count, ReplayCount::Times(2));
        assert!(!l.dropped);
        assert_eq!(l.source_display(), "orders/3/42");
    }

    #[test]
    fn garbage_non_utf8_null_and_missing_headers_read_as_absent_without_panicking() {
        let r = record(vec![
            (b"x-dlq-source-topic", Some(b"bad topic\xff")),
            (b"x-dlq-source-partition", Some(b"-1")),
            (b"x-dlq-source-offset", Some(b"\xff\xfe")),
            (b"x-dlq-attempts", None),
            (b"x-dlq-error-class", Some(b"http_99999999999")),
            (b"x-dlq-replay-count", Some(b"lots")),
            (b"x-dlq-dropped", None),
            (b"\xff\x00", Some(b"\x1b[2J")),
        ]);
        let l = Letter::from_record(&r);
        assert_eq!(l.topic(), None);
        assert_eq!((l.partition(), l.offset(), l.attempts()), (None, None, None));
        assert_eq!(l.status(), None);
        assert_eq!(l.replay_count, ReplayCount::Invalid);
        assert!(l.dropped, "a null x-dlq-dropped still says something was dropped");
        assert_eq!(l.source_display(), "bad topic\\xff/-1/\\xff\\xfe");
        let empty = Letter::from_record(&record(vec![]));
        assert_eq!(
            (empty.topic(), empty.class(), empty.replay_count),
            (None, None, ReplayCount::Never)
        );
        assert_eq!(empty.source_display(), "-/-/-");
    }

    #[test]
    fn the_last_of_duplicate_headers_counts() {
        let r = record(vec![
            (b"x-dlq-source-topic", Some(b"old")),
            (b"x-dlq-source-topic", Some(b"new")),
        ]);
        assert_eq!(Letter::from_record(&r).topic(), Some("new"));
    }

    #[test]
    fn escaping_leaves_no_control_character_for_a_terminal() {
        let nasty = b"ok \x1b[31mred\x07\r\n\t\\ \xc2\x9b2J \xe2\x80\xae rtl \xff\xfe caf\xc3\xa9";
        let e = escape(nasty, 1000);
        assert!(e.chars().all(|c| !c.is_control()), "{e:?}");
        assert_eq!(
            e,
            "ok \\u{1b}[31mred\\u{7}\\r\\n\\t\\\\ \\u{9b}2J \\u{202e} rtl \\xff\\xfe caf\u{e9}"
        );
        assert_eq!(escape(b"abcdef", 3), "abc...");
        assert_eq!(escape("é".as_bytes(), 1), "\\xc3...", "a cut character shows as bytes");
        assert_eq!(escape(b"", 10), "");
    }

    #[test]
    fn topic_names_are_checked_like_kafka_does() {
        assert!(is_topic_name("orders.v1_x-2"));
        for bad in ["", ".", "..", "a b", "a/b", "ü", &"a".repeat(250)] {
            assert!(!is_topic_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_ago_and_anything_else_is_an_error() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z", 0), Ok(1000));
        assert_eq!(parse_time("90m", 10_000_000), Ok(10_000_000 - 5_400_000));
        assert!(parse_time("yesterday", 0).is_err());
        assert!(parse_time("2026-13-45T00:00:00Z", 0).is_err());
        assert!(parse_time("", 0).is_err());
    }

    #[test]
    fn filters_parse_known_keys_and_reject_others() {
        assert_eq!(
            Filter::parse("error_class=http_422"),
            Ok(Filter::ErrorClass("http_422".into()))
        );
        assert_eq!(Filter::parse("status=500"), Ok(Filter::Status(500)));
        assert!(Filter::parse("colour=red").is_err_and(|e| e.contains("unknown key")));
        assert!(Filter::parse("status=abc").is_err());
        assert!(Filter::parse("error_class").is_err());
        let l = Letter::from_record(&record(vec![(b"x-dlq-error-class", Some(b"http_422"))]));
        assert!(Filter::ErrorClass("http_422".into()).matches(&l));
        assert!(Filter::Status(422).matches(&l));
        assert!(!Filter::ErrorClass("http_500".into()).matches(&l));
        assert!(!Filter::SourceTopic("x".into()).matches(&l));
    }
}
