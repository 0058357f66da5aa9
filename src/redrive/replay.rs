//! `kafka-sidecar dlq replay`: sends dead letters back.
//!
//! Reads the DLQ with its own consumer group from the group's committed position up to the
//! high watermarks taken at the start (records dead-lettered meanwhile wait for the next
//! run), and for each record decides ([`decide`]): replay it, or skip it for a counted
//! reason. Replayed records are written with the idempotent producer (acks=all) in batches;
//! the group's position is committed only after every write of the batch is acknowledged,
//! so a second run continues where the first stopped and a crash replays at most the
//! unacknowledged batch again. Skipped records are committed past too: the position belongs
//! to the selection (filters, time window, destination), and each selection has its own
//! group ([`group_name`]).
//!
//! A replayed record has the dead letter's key, value and headers without any `x-dlq-*`
//! header, plus `x-dlq-replayed-from` (the dead letter's `TOPIC/PARTITION/OFFSET`) and
//! `x-dlq-replay-count` (replays so far, this one included). Stripping the old `x-dlq-*`
//! headers means a record that fails again is dead-lettered with fresh source coordinates and
//! error headers, and its replay count and the link to the previous dead letter travel with
//! it: the loop guard sees the count, and the history is a chain of dead letters.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::future_producer::DeliveryFuture;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use sha2::{Digest, Sha256};

use super::letter::{self, escape, Filter, Letter, PREFIX, REPLAYED_FROM, REPLAY_COUNT};
use super::progress::{rate, Progress};
use super::{dlq_topic, CommonArgs, Failure, Reader, StartAt};
use crate::config::Config;
use crate::kafka_client::{connection_config, KafkaLogContext};
use crate::record::{native, Record};

/// Writes in flight before the run waits for their acknowledgements and commits.
const BATCH: usize = 500;
/// Loop-guard skips listed one by one in the summary (the rest are counted).
const LISTED: usize = 20;

#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Where to write: `original` (each record's source topic and partition, from its
    /// `x-dlq-source-*` headers) or a topic name (partitioned by key).
    #[arg(long, default_value = "original")]
    pub to: String,
    /// Only records matching `KEY=VALUE` (repeatable, all must match); keys: error_class,
    /// status, source_topic, consumer_group.
    #[arg(long = "filter", value_name = "KEY=VALUE")]
    pub filters: Vec<String>,
    /// Only records dead-lettered at or after this time (RFC 3339, or a duration ago: `2h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records dead-lettered at or before this time (RFC 3339, or a duration ago).
    #[arg(long)]
    pub until: Option<String>,
    /// Replay at most this many records, then stop (the next run continues after them).
    #[arg(long)]
    pub limit: Option<u64>,
    /// At most this many records per second.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Read and decide, but write and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip (and report) records already replayed this many times.
    #[arg(long, default_value_t = 3)]
    pub max_replays: u32,
    /// The consumer group holding the replay position (default: derived from kafka.group_id
    /// and the selection, see the README).
    #[arg(long)]
    pub group: Option<String>,
}

impl ReplayArgs {
    pub fn config(&self) -> Option<&std::path::Path> {
        self.common.config.as_deref()
    }
}

/// Where replayed records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Original,
    Topic(String),
}

/// Which records a run replays, and where.
#[derive(Debug, Clone)]
pub struct Selection {
    pub filters: Vec<Filter>,
    /// Milliseconds since the epoch, inclusive.
    pub since: Option<i64>,
    pub until: Option<i64>,
    pub to: Destination,
    pub max_replays: u32,
}

/// Why a record is not replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// It does not match `--filter`, `--since` or `--until`.
    Filtered,
    /// The dead letter lacks its value (`x-dlq-dropped`): replay it from the source topic.
    Incomplete,
    /// `x-dlq-replay-count` is not a number, so the loop guard cannot vouch for it.
    BadReplayCount,
    /// Replayed `--max-replays` times already.
    LoopGuard,
    /// `--to original`, and no usable `x-dlq-source-topic`.
    NoSource,
}

/// A record to write.
#[derive(Debug, Clone)]
pub struct Replay {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(Bytes, Option<Bytes>)>,
    /// Replays of the record, this one included.
    pub count: u32,
}

/// What to do with one dead letter.
pub fn decide(r: &Record, l: &Letter, sel: &Selection) -> Result<Replay, Skip> {
    let in_window = |t: Option<i64>| {
        sel.since.is_none_or(|s| t.is_some_and(|t| t >= s)) && sel.until.is_none_or(|u| t.is_some_and(|t| t <= u))
    };
    if !sel.filters.iter().all(|f| f.matches(l)) || !in_window(r.timestamp_ms) {
        return Err(Skip::Filtered);
    }
    if l.dropped {
        return Err(Skip::Incomplete);
    }
    let before = l.replay_count.times().ok_or(Skip::BadReplayCount)?;
    if before >= sel.max_replays {
        return Err(Skip::LoopGuard);
    }
    let (topic, partition) = match &sel.to {
        Destination::Original => (l.topic().ok_or(Skip::NoSource)?.to_string(), l.partition()),
        Destination::Topic(t) => (t.clone(), None),
    };
    let count = before.saturating_add(1);
    let mut headers: Vec<(Bytes, Option<Bytes>)> = r
        .headers
        .iter()
        .filter(|(name, _)| !name.starts_with(PREFIX))
        .cloned()
        .collect();
    let from = format!("{}/{}/{}", r.topic, r.partition, r.offset);
    headers.push((Bytes::from_static(REPLAYED_FROM.as_bytes()), Some(Bytes::from(from))));
    headers.push((
        Bytes::from_static(REPLAY_COUNT.as_bytes()),
        Some(Bytes::from(count.to_string())),
    ));
    Ok(Replay {
        topic,
        partition,
        key: r.key.clone(),
        value: r.value.clone(),
        headers,
        count,
    })
}

/// The replay group: `<kafka.group_id>-dlq-replay` for the plain selection (every record,
/// back to its source), else `<kafka.group_id>-dlq-replay-<8 hex digits>` of a hash of the
/// selection's arguments, so two selections keep separate positions.
pub fn group_name(base: &str, args: &ReplayArgs) -> String {
    let mut parts: Vec<String> = args.filters.iter().map(|f| format!("filter={f}")).collect();
    parts.sort();
    parts.extend(args.since.iter().map(|s| format!("since={s}")));
    parts.extend(args.until.iter().map(|s| format!("until={s}")));
    if args.to != "original" {
        parts.push(format!("to={}", args.to));
    }
    if parts.is_empty() {
        return format!("{base}-dlq-replay");
    }
    let digest = Sha256::digest(parts.join("\n").as_bytes());
    let short: String = hex::encode(digest).chars().take(8).collect();
    format!("{base}-dlq-replay-{short}")
}

/// Parses and checks the arguments (exit 2 on any error, all of them named).
fn selection(args: &ReplayArgs) -> Result<Selection, Failure> {
    let mut errors = Vec::new();
    let mut filters = Vec::new();
    for f in &args.filters {
        match Filter::parse(f) {
            Ok(f) => filters.push(f),
            Err(e) => errors.push(e),
        }
    }
    let now = letter::now_ms();
    let mut time = |name: &str, v: &Option<String>| {
        v.as_deref().and_then(|s| {
            letter::parse_time(s, now)
                .map_err(|e| errors.push(format!("--{name}: {e}")))
                .ok()
        })
    };
    let since = time("since", &args.since);
    let until = time("until", &args.until);
    let to = match args.to.as_str() {
        "original" => Destination::Original,
        t if letter::is_topic_name(t) => Destination::Topic(t.to_string()),
        t => {
            errors.push(format!(
                "--to: {:?} is neither `original` nor a valid topic name",
                escape(t.as_bytes(), 300)
            ));
            Destination::Original
        }
    };
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0) {
            errors.push(format!("--rate: {r} is not a positive number of records per second"));
        }
    }
    if args.group.as_deref().is_some_and(str::is_empty) {
        errors.push("--group: empty".into());
    }
    if !errors.is_empty() {
        return Err(Failure::Usage(errors.join("; ")));
    }
    Ok(Selection {
        filters,
        since,
        until,
        to,
        max_replays: args.max_replays,
    })
}

/// What became of the records read.
#[derive(Debug, Default, Clone)]
struct Counts {
    read: u64,
    replayed: u64,
    filtered: u64,
    incomplete: u64,
    bad_replay_count: u64,
    loop_guard: u64,
    no_source: u64,
}

impl Counts {
    fn skipped(&self) -> u64 {
        self.filtered + self.incomplete + self.bad_replay_count + self.loop_guard + self.no_source
    }

    fn skip(&mut self, s: Skip) {
        let n = match s {
            Skip::Filtered => &mut self.filtered,
            Skip::Incomplete => &mut self.incomplete,
            Skip::BadReplayCount => &mut self.bad_replay_count,
            Skip::LoopGuard => &mut self.loop_guard,
            Skip::NoSource => &mut self.no_source,
        };
        *n += 1;
    }

    fn line(&self, dry_run: bool) -> String {
        let verb = if dry_run { "would replay" } else { "replayed" };
        format!("{verb} {}, skipped {}", self.replayed, self.skipped())
    }
}

/// A write waiting for its acknowledgement.
struct Pending {
    partition: i32,
    offset: i64,
    topic: String,
    delivery: DeliveryFuture,
}

pub fn run(cfg: &Config, args: &ReplayArgs) -> Result<(), Failure> {
    let sel = selection(args)?;
    let topic = dlq_topic(cfg, args.common.dlq.as_deref())?;
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| group_name(&cfg.kafka.group_id, args));
    let timeout = args.common.timeout;
    let mut reader = Reader::open(cfg, &topic, &group, StartAt::Committed, timeout)?;
    let producer = if args.dry_run { None } else { Some(producer(cfg)?) };
    if let (Destination::Topic(t), Some(_)) = (&sel.to, &producer) {
        super::topic_partitions(&reader.consumer, t, timeout, &cfg.kafka.brokers)?;
    }
    let mut progress = Progress::new(reader.total());
    let mut counts = Counts::default();
    let mut guarded: Vec<String> = Vec::new();
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let started = Instant::now();
    let outcome: Result<(), Failure> = loop {
        if args.limit.is_some_and(|l| counts.replayed >= l) {
            break Ok(());
        }
        let record = match reader.next() {
            Ok(Some(r)) => r,
            Ok(None) => break Ok(()),
            Err(f) => break Err(f),
        };
        counts.read += 1;
        let letter = Letter::from_record(&record);
        match decide(&record, &letter, &sel) {
            Err(skip) => {
                counts.skip(skip);
                if skip == Skip::LoopGuard && guarded.len() < LISTED {
                    guarded.push(format!(
                        "{}/{}/{} (source {}, replayed {} times)",
                        record.topic,
                        record.partition,
                        record.offset,
                        letter.source_display(),
                        letter.replay_count.times().unwrap_or_default()
                    ));
                }
            }
            Ok(out) => {
                counts.replayed += 1;
                if let Some(producer) = &producer {
                    pace(args.rate, counts.replayed, started);
                    if let Err(f) = send(producer, &out, &record, &mut pending, &mut positions) {
                        break Err(f);
                    }
                }
            }
        }
        positions.insert(record.partition, record.offset + 1);
        progress.update(counts.read, &counts.line(args.dry_run));
        if pending.len() >= BATCH {
            if let Err(f) = settle(&mut pending, &mut positions).and_then(|()| reader.commit(&positions)) {
                break Err(f);
            }
        }
    };
    // Whatever stopped the run, what was acknowledged is committed.
    let settled = settle(&mut pending, &mut positions);
    let committed = if args.dry_run {
        Ok(())
    } else {
        reader.commit(&positions)
    };
    progress.finish();
    print_summary(&topic, &group, args, &counts, &guarded, progress.elapsed());
    outcome.and(settled).and(committed)
}

fn producer(cfg: &Config) -> Result<FutureProducer<KafkaLogContext>, Failure> {
    let mut cc = connection_config(cfg, "-dlq-replay");
    cc.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        // Java's partitioner, so `--to TOPIC` puts a key where a Java producer would.
        .set("partitioner", "murmur2_random");
    cc.create_with_context(KafkaLogContext::quiet())
        .map_err(|e| Failure::Usage(format!("cannot create the replay producer: {e}")))
}

/// Sleeps so that at most `rate` records per second are written.
fn pace(rate: Option<f64>, n: u64, started: Instant) {
    let Some(rate) = rate else { return };
    let due = Duration::try_from_secs_f64((n.saturating_sub(1)) as f64 / rate).unwrap_or(Duration::MAX);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait.min(Duration::from_secs(3600)));
    }
}

/// Queues one write; waits for the queued ones first when the producer's queue is full.
fn send(
    producer: &FutureProducer<KafkaLogContext>,
    out: &Replay,
    from: &Record,
    pending: &mut Vec<Pending>,
    positions: &mut BTreeMap<i32, i64>,
) -> Result<(), Failure> {
    loop {
        let mut headers = OwnedHeaders::new_with_capacity(out.headers.len());
        for (name, value) in &out.headers {
            headers = native::add(headers, name, value.as_deref());
        }
        let mut rec = FutureRecord::<[u8], [u8]>::to(&out.topic).headers(headers);
        if let Some(p) = out.partition {
            rec = rec.partition(p);
        }
        if let Some(k) = &out.key {
            rec = rec.key(k.as_ref());
        }
        if let Some(v) = &out.value {
            rec = rec.payload(v.as_ref());
        }
        match producer.send_result(rec) {
            Ok(delivery) => {
                pending.push(Pending {
                    partition: from.partition,
                    offset: from.offset,
                    topic: out.topic.clone(),
                    delivery,
                });
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) if !pending.is_empty() => {
                settle(pending, positions)?;
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err((e, _)) => {
                positions.insert(from.partition, from.offset);
                return Err(Failure::Runtime(format!(
                    "cannot write DLQ record {}/{}/{} to {}: {e}",
                    from.topic, from.partition, from.offset, out.topic
                )));
            }
        }
    }
}

/// Waits for every queued write. A failed write moves its partition's position back to it,
/// so the next run starts there (records after it may be written twice: at-least-once).
fn settle(pending: &mut Vec<Pending>, positions: &mut BTreeMap<i32, i64>) -> Result<(), Failure> {
    let mut first_error: Option<String> = None;
    for p in pending.drain(..) {
        let error = match futures::executor::block_on(p.delivery) {
            Ok(Ok(_)) => continue,
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "the producer went away".to_string(),
        };
        let at = positions.entry(p.partition).or_insert(p.offset);
        *at = (*at).min(p.offset);
        first_error.get_or_insert_with(|| {
            format!(
                "writing DLQ record at partition {} offset {} to {} failed: {error}; the replay position \
                 stays before it, run again to continue",
                p.partition, p.offset, p.topic
            )
        });
    }
    first_error.map_or(Ok(()), |e| Err(Failure::Runtime(e)))
}

fn print_summary(topic: &str, group: &str, args: &ReplayArgs, c: &Counts, guarded: &[String], elapsed: Duration) {
    let dry = if args.dry_run {
        " (dry run: nothing written or committed)"
    } else {
        ""
    };
    println!("dlq replay summary{dry}");
    println!("dlq topic: {topic}");
    println!("replay group: {group}");
    println!("destination: {}", args.to);
    println!("read: {}", c.read);
    if args.dry_run {
        println!("would replay: {}", c.replayed);
        println!("replayed: 0");
    } else {
        println!("replayed: {}", c.replayed);
    }
    println!("skipped: {}", c.skipped());
    println!("skipped filtered: {}", c.filtered);
    println!("skipped no source: {}", c.no_source);
    println!("skipped loop guard: {}", c.loop_guard);
    println!("skipped incomplete: {}", c.incomplete);
    println!("skipped bad replay count: {}", c.bad_replay_count);
    println!(
        "elapsed: {:.1}s ({:.0} records/s)",
        elapsed.as_secs_f64(),
        rate(c.read, elapsed)
    );
    for g in guarded {
        println!("loop guard: {g}");
    }
    if c.loop_guard > guarded.len() as u64 {
        println!("loop guard: ... and {} more", c.loop_guard - guarded.len() as u64);
    }
    if c.incomplete > 0 {
        println!(
            "note: {} dead letters lack their value (x-dlq-dropped); replay them from their source topic",
            c.incomplete
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn dead_letter(headers: Vec<(&[u8], Option<&[u8]>)>) -> Record {
        Record {
            topic: Arc::from("dlq"),
            partition: 1,
            offset: 9,
            timestamp_ms: Some(5_000),
            key: Some(Bytes::from_static(b"k")),
            value: Some(Bytes::from_static(b"v")),
            headers: headers
                .into_iter()
                .map(|(k, v)| (Bytes::copy_from_slice(k), v.map(Bytes::copy_from_slice)))
                .collect(),
            generation: 0,
        }
    }

    fn sel() -> Selection {
        Selection {
            filters: vec![],
            since: None,
            until: None,
            to: Destination::Original,
            max_replays: 3,
        }
    }

    fn standard() -> Record {
        dead_letter(vec![
            (b"app-header", Some(b"a")),
            (b"x-dlq-source-topic", Some(b"orders")),
            (b"x-dlq-source-partition", Some(b"2")),
            (b"x-dlq-source-offset", Some(b"40")),
            (b"x-dlq-error-class", Some(b"http_422")),
        ])
    }

    #[test]
    fn a_replayed_record_keeps_key_value_and_own_headers_and_gets_fresh_replay_headers() {
        let r = standard();
        let out = decide(&r, &Letter::from_record(&r), &sel()).expect("replayed");
        assert_eq!((out.topic.as_str(), out.partition, out.count), ("orders", Some(2), 1));
        assert_eq!(
            (out.key.as_deref(), out.value.as_deref()),
            (Some(&b"k"[..]), Some(&b"v"[..]))
        );
        let names: Vec<&[u8]> = out.headers.iter().map(|(n, _)| n.as_ref()).collect();
        assert_eq!(
            names,
            vec![&b"app-header"[..], b"x-dlq-replayed-from", b"x-dlq-replay-count"]
        );
        assert_eq!(out.headers[1].1.as_deref(), Some(&b"dlq/1/9"[..]));
        assert_eq!(out.headers[2].1.as_deref(), Some(&b"1"[..]));
    }

    #[test]
    fn the_loop_guard_stops_a_record_replayed_max_replays_times() {
        let mut r = standard();
        r.headers.push((
            Bytes::from_static(b"x-dlq-replay-count"),
            Some(Bytes::from_static(b"2")),
        ));
        let out = decide(&r, &Letter::from_record(&r), &sel()).expect("third replay allowed");
        assert_eq!(out.count, 3);
        r.headers.push((
            Bytes::from_static(b"x-dlq-replay-count"),
            Some(Bytes::from_static(b"3")),
        ));
        assert_eq!(
            decide(&r, &Letter::from_record(&r), &sel()).err(),
            Some(Skip::LoopGuard)
        );
        r.headers.push((
            Bytes::from_static(b"x-dlq-replay-count"),
            Some(Bytes::from_static(b"\xff")),
        ));
        assert_eq!(
            decide(&r, &Letter::from_record(&r), &sel()).err(),
            Some(Skip::BadReplayCount)
        );
    }

    #[test]
    fn records_without_a_usable_source_are_skipped_unless_a_topic_is_given() {
        for source in [None, Some(&b"\xff\xfe"[..]), Some(&b"bad topic"[..]), Some(&b""[..])] {
            let mut headers: Vec<(&[u8], Option<&[u8]>)> = vec![(b"x-dlq-error-class", Some(b"http_422"))];
            if let Some(s) = source {
                headers.push((b"x-dlq-source-topic", Some(s)));
            }
            let r = dead_letter(headers);
            let l = Letter::from_record(&r);
            assert_eq!(decide(&r, &l, &sel()).err(), Some(Skip::NoSource), "{source:?}");
            let to = Selection {
                to: Destination::Topic("elsewhere".into()),
                ..sel()
            };
            let out = decide(&r, &l, &to).expect("replayed to the given topic");
            assert_eq!((out.topic.as_str(), out.partition), ("elsewhere", None));
        }
    }

    #[test]
    fn filters_windows_and_dropped_values_skip_records() {
        let r = standard();
        let l = Letter::from_record(&r);
        let only_500 = Selection {
            filters: vec![Filter::ErrorClass("http_500".into())],
            ..sel()
        };
        assert_eq!(decide(&r, &l, &only_500).err(), Some(Skip::Filtered));
        let later = Selection {
            since: Some(6_000),
            ..sel()
        };
        assert_eq!(decide(&r, &l, &later).err(), Some(Skip::Filtered));
        let window = Selection {
            since: Some(5_000),
            until: Some(5_000),
            ..sel()
        };
        assert!(decide(&r, &l, &window).is_ok(), "the window is inclusive");
        let mut dropped = standard();
        dropped
            .headers
            .push((Bytes::from_static(b"x-dlq-dropped"), Some(Bytes::from_static(b"value"))));
        assert_eq!(
            decide(&dropped, &Letter::from_record(&dropped), &sel()).err(),
            Some(Skip::Incomplete)
        );
    }

    #[test]
    fn each_selection_has_its_own_replay_group() {
        let args = |filters: &[&str], to: &str| ReplayArgs {
            common: CommonArgs {
                config: None,
                dlq: None,
                timeout: Duration::from_secs(1),
            },
            to: to.into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
            since: None,
            until: None,
            limit: None,
            rate: None,
            dry_run: false,
            max_replays: 3,
            group: None,
        };
        assert_eq!(group_name("g", &args(&[], "original")), "g-dlq-replay");
        let a = group_name("g", &args(&["error_class=http_422", "status=422"], "original"));
        let b = group_name("g", &args(&["status=422", "error_class=http_422"], "original"));
        assert_eq!(a, b, "filter order does not matter");
        assert!(a.starts_with("g-dlq-replay-") && a.len() == "g-dlq-replay-".len() + 8);
        assert_ne!(a, group_name("g", &args(&["error_class=http_500"], "original")));
        assert_ne!(group_name("g", &args(&[], "other")), "g-dlq-replay");
    }
}
