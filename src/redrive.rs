//! DLQ redrive: the `kafka-sidecar dlq inspect|replay` commands.
//!
//! `inspect` reads the dead-letter topic from its beginning to its end (as it was when the
//! command started) and shows the dead letters; it never commits and never subscribes, so it
//! moves nobody's position. `replay` reads it with its own consumer group, re-produces each
//! selected dead letter to its source topic (or another topic), and commits its position only
//! after the writes are acknowledged: a second run continues where the first stopped, and a
//! crash replays at most the unacknowledged tail again (at-least-once).
//!
//! Dead letters are outside data: every `x-dlq-*` header is decoded totally ([`letter`]), and
//! everything shown on a terminal is escaped ([`letter::escape`]). Nothing here panics on any
//! content of the DLQ.

pub mod inspect;
pub mod letter;
pub mod progress;
pub mod replay;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{redact, Config};
use crate::kafka_client::{connection_config, KafkaLogContext};
use crate::record::Record;

/// How long the reader waits without any record or end-of-partition before it gives up.
const STALL: Duration = Duration::from_secs(60);

/// The `dlq` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum DlqCommand {
    /// Send dead letters back to their source topic (or another topic).
    Replay(replay::ReplayArgs),
    /// Show dead letters and counts by error class (read-only).
    Inspect(inspect::InspectArgs),
}

impl DlqCommand {
    /// The `--config` file of the command.
    pub fn config(&self) -> Option<&Path> {
        match self {
            DlqCommand::Replay(a) => a.config(),
            DlqCommand::Inspect(a) => a.config(),
        }
    }
}

/// Options every `dlq` command has.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// TOML config file; `KAFKA_SIDECAR_<SECTION>__<KEY>` env vars override it.
    #[arg(long, env = "KAFKA_SIDECAR_CONFIG")]
    pub config: Option<PathBuf>,
    /// The dead-letter topic (default: the config's `dlq.topic`).
    #[arg(long)]
    pub dlq: Option<String>,
    /// How long to wait for the brokers before giving up (e.g. `10s`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// Why a command failed, and so its exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad arguments or config (exit 2).
    Usage(String),
    /// The brokers, the topic or a write failed (exit 1).
    Runtime(String),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Usage(_) => ExitCode::from(2),
            Failure::Runtime(_) => ExitCode::FAILURE,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::Usage(m) | Failure::Runtime(m) => m,
        }
    }
}

/// Runs a `dlq` command; prints its output to stdout and progress and errors to stderr.
pub fn run(cfg: &Config, command: &DlqCommand) -> ExitCode {
    let result = match command {
        DlqCommand::Replay(args) => replay::run(cfg, args),
        DlqCommand::Inspect(args) => inspect::run(cfg, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("kafka-sidecar dlq: {}", redact::scrub(f.message()));
            f.exit_code()
        }
    }
}

/// The DLQ topic to read: `--dlq`, else the config's `dlq.topic`.
fn dlq_topic(cfg: &Config, arg: Option<&str>) -> Result<String, Failure> {
    let topic = arg.unwrap_or(&cfg.dlq.topic);
    if topic.is_empty() {
        return Err(Failure::Usage(
            "no dead-letter topic: set dlq.topic in the config or pass --dlq TOPIC".into(),
        ));
    }
    if !letter::is_topic_name(topic) {
        return Err(Failure::Usage(format!(
            "--dlq: {:?} is not a valid topic name",
            letter::escape(topic.as_bytes(), 300)
        )));
    }
    Ok(topic.to_string())
}

/// One partition of the DLQ and the part of it a command reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub partition: i32,
    /// First offset to read.
    pub start: i64,
    /// The high watermark when the command started: reading stops before it.
    pub end: i64,
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartAt {
    /// The group's committed position (the beginning when it has none).
    Committed,
    /// The beginning of each partition.
    Beginning,
}

/// Reads a topic from given positions up to its high watermarks at the start.
struct Reader {
    consumer: BaseConsumer<KafkaLogContext>,
    topic: Arc<str>,
    /// End offset of each partition still being read.
    open: BTreeMap<i32, i64>,
    spans: Vec<Span>,
    timeout: Duration,
    brokers: String,
}

impl Reader {
    /// Connects, finds the topic's partitions and watermarks, and assigns them (no
    /// subscription, so the reader never joins `group`). `group` is the consumer group whose
    /// committed position [`StartAt::Committed`] starts from and [`Reader::commit`] moves.
    fn open(cfg: &Config, topic: &str, group: &str, at: StartAt, timeout: Duration) -> Result<Self, Failure> {
        let mut cc: ClientConfig = connection_config(cfg, "-dlq-tool");
        cc.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("queued.max.messages.kbytes", "16384")
            .set("group.id", group);
        let consumer: BaseConsumer<KafkaLogContext> = cc
            .create_with_context(KafkaLogContext::quiet())
            .map_err(|e| Failure::Usage(format!("cannot create the Kafka consumer: {e}")))?;
        let brokers = cfg.kafka.brokers.clone();
        let spans = match spans(&consumer, topic, at, timeout, &brokers) {
            Ok(spans) => spans,
            Err(f) => {
                // A consumer that never reached its brokers can hang in its destructor
                // (librdkafka waits for the group coordinator); the command is about to exit
                // with the error, so the client is leaked instead.
                std::mem::forget(consumer);
                return Err(f);
            }
        };
        let open: BTreeMap<i32, i64> = spans
            .iter()
            .filter(|s| s.start < s.end)
            .map(|s| (s.partition, s.end))
            .collect();
        {
            let mut tpl = TopicPartitionList::new();
            for s in spans.iter().filter(|s| s.start < s.end) {
                tpl.add_partition_offset(topic, s.partition, Offset::Offset(s.start))
                    .map_err(|e| Failure::Runtime(format!("cannot assign {topic}/{}: {e}", s.partition)))?;
            }
            consumer
                .assign(&tpl)
                .map_err(|e| Failure::Runtime(format!("cannot assign the partitions of {topic}: {e}")))?;
        }
        Ok(Self {
            consumer,
            topic: Arc::from(topic),
            open,
            spans,
            timeout,
            brokers,
        })
    }

    /// Records left to read when the command started.
    fn total(&self) -> u64 {
        self.spans
            .iter()
            .map(|s| u64::try_from(s.end - s.start).unwrap_or(0))
            .sum()
    }

    /// The next record below the end offsets; `None` when every partition is read to its end.
    fn next(&mut self) -> Result<Option<Record>, Failure> {
        let mut last = Instant::now();
        loop {
            if self.open.is_empty() {
                return Ok(None);
            }
            if last.elapsed() > STALL {
                return Err(Failure::Runtime(format!(
                    "no record from {} for {}s with partitions left to read ({:?}); are the brokers at {} up?",
                    self.topic,
                    STALL.as_secs(),
                    self.open.keys().collect::<Vec<_>>(),
                    self.brokers
                )));
            }
            let Some(polled) = self.consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = match polled {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) => {
                    self.close(p);
                    last = Instant::now();
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "consumer error while reading the DLQ");
                    continue;
                }
            };
            use rdkafka::message::Message;
            let (p, offset) = (m.partition(), m.offset());
            let Some(end) = self.open.get(&p).copied() else {
                continue;
            };
            last = Instant::now();
            if offset >= end {
                self.close(p);
                continue;
            }
            let record = Record::from_message(&m, self.topic.clone(), 0);
            if offset + 1 >= end {
                self.close(p);
            }
            return Ok(Some(record));
        }
    }

    /// Stops reading a partition (it reached its end offset).
    fn close(&mut self, partition: i32) {
        if self.open.remove(&partition).is_none() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, partition);
        if let Err(e) = self.consumer.pause(&tpl) {
            tracing::debug!(error = %e, partition, "cannot pause a finished DLQ partition");
        }
    }

    /// Commits `positions` (the next offset to read, per partition) synchronously.
    fn commit(&self, positions: &BTreeMap<i32, i64>) -> Result<(), Failure> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in positions {
            tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o))
                .map_err(|e| Failure::Runtime(format!("cannot commit {}/{p}: {e}", self.topic)))?;
        }
        self.consumer.commit(&tpl, CommitMode::Sync).map_err(|e| {
            Failure::Runtime(format!(
                "cannot commit the replay position of {} within {}s: {e}",
                self.topic,
                self.timeout.as_secs()
            ))
        })
    }
}

/// The partitions of `topic` with their watermarks, and where to start reading each.
fn spans(
    consumer: &BaseConsumer<KafkaLogContext>,
    topic: &str,
    at: StartAt,
    timeout: Duration,
    brokers: &str,
) -> Result<Vec<Span>, Failure> {
    let partitions = topic_partitions(consumer, topic, timeout, brokers)?;
    let mut spans = Vec::with_capacity(partitions.len());
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(|e| unreachable(brokers, timeout, &e))?;
        spans.push(Span {
            partition: *p,
            start: low,
            end: high,
        });
    }
    if at == StartAt::Committed {
        let committed =
            committed(consumer, topic, &partitions, timeout).map_err(|e| unreachable(brokers, timeout, &e))?;
        for s in &mut spans {
            // A position below the low watermark was deleted by retention: start at the
            // oldest record still there.
            if let Some(c) = committed.get(&s.partition) {
                s.start = (*c).clamp(s.start, s.end.max(s.start));
            }
        }
    }
    Ok(spans)
}

/// The partitions of `topic`; an error naming the brokers when they do not answer.
fn topic_partitions(
    consumer: &BaseConsumer<KafkaLogContext>,
    topic: &str,
    timeout: Duration,
    brokers: &str,
) -> Result<Vec<i32>, Failure> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| unreachable(brokers, timeout, &e))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(Failure::Runtime(format!("topic {topic} does not exist")));
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(Failure::Runtime(format!(
            "topic {topic} does not exist (or may not be described)"
        )));
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// The committed position of the consumer's group per partition (absent: none).
fn committed(
    consumer: &BaseConsumer<KafkaLogContext>,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, *p);
    }
    // Scoped: a list returned by the consumer must be dropped before the consumer.
    let got = consumer.committed_offsets(tpl, timeout)?;
    let out = got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    Ok(out)
}

fn unreachable(brokers: &str, timeout: Duration, e: &KafkaError) -> Failure {
    Failure::Runtime(format!(
        "cannot reach the Kafka brokers at {brokers} within {}s ({e}); check kafka.brokers and [kafka.properties]",
        timeout.as_secs()
    ))
}
