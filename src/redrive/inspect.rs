//! `kafka-sidecar dlq inspect`: shows dead letters and counts them by error class.
//!
//! Read-only: the reader never subscribes (so joins no group) and never commits, so neither the sidecar's
//! nor the replay group's position moves. It reads the whole DLQ up to its end at the start
//! (the counts cover every record), and shows the first `--limit` records. Every text taken
//! from a record (header values, the value's first bytes) is escaped
//! ([`super::letter::escape`]), in the table and in the JSON alike.

use std::collections::BTreeMap;

use serde_json::json;

use super::letter::{escape, Letter};
use super::progress::Progress;
use super::{dlq_topic, CommonArgs, Failure, Reader, StartAt};
use crate::config::Config;
use crate::record::Record;

/// Bytes of the value shown.
const PREVIEW_BYTES: usize = 48;
/// Distinct error classes counted one by one; further classes count as `(other)`.
const MAX_CLASSES: usize = 100;
/// Bytes of an error class kept for counting and display.
const CLASS_BYTES: usize = 80;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Records shown (the counts cover the whole DLQ).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

impl InspectArgs {
    pub fn config(&self) -> Option<&std::path::Path> {
        self.common.config.as_deref()
    }
}

/// One dead letter as shown: every text already escaped.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub dlq_partition: i32,
    pub dlq_offset: i64,
    pub dlq_timestamp_ms: Option<i64>,
    pub source: String,
    pub source_topic: Option<String>,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub error_class: Option<String>,
    pub status: Option<u16>,
    pub attempts: Option<u32>,
    pub replay_count: Option<u32>,
    pub dropped: bool,
    /// Bytes of the value; `None` for a null value.
    pub value_bytes: Option<usize>,
    pub value_preview: String,
}

impl Row {
    pub fn new(r: &Record, l: &Letter) -> Self {
        let text = |b: Option<&bytes::Bytes>, max| b.map(|b| escape(b, max));
        Self {
            dlq_partition: r.partition,
            dlq_offset: r.offset,
            dlq_timestamp_ms: r.timestamp_ms,
            source: l.source_display(),
            source_topic: text(l.source_topic.as_ref(), 300),
            source_partition: l.partition(),
            source_offset: l.offset(),
            error_class: text(l.error_class.as_ref(), CLASS_BYTES),
            status: l.status(),
            attempts: l.attempts(),
            replay_count: l.replay_count.times(),
            dropped: l.dropped,
            value_bytes: r.value.as_ref().map(|v| v.len()),
            value_preview: match &r.value {
                Some(v) => escape(v, PREVIEW_BYTES),
                None if l.dropped => "(dropped)".into(),
                None => "(null)".into(),
            },
        }
    }
}

/// Counts by error class, with a bounded number of distinct classes.
#[derive(Debug, Default)]
pub struct ClassCounts {
    counts: BTreeMap<String, u64>,
    other: u64,
}

impl ClassCounts {
    pub fn add(&mut self, class: Option<&str>) {
        let class = class.unwrap_or("(none)");
        if let Some(n) = self.counts.get_mut(class) {
            *n += 1;
        } else if self.counts.len() < MAX_CLASSES {
            self.counts.insert(class.to_string(), 1);
        } else {
            self.other += 1;
        }
    }

    /// Classes by count, largest first; `(other)` last when some classes were not kept.
    pub fn sorted(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self.counts.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if self.other > 0 {
            v.push(("(other)".into(), self.other));
        }
        v
    }
}

pub fn run(cfg: &Config, args: &InspectArgs) -> Result<(), Failure> {
    let topic = dlq_topic(cfg, args.common.dlq.as_deref())?;
    // librdkafka needs a group id to assign partitions; this one only names the client: the
    // reader never subscribes (so never joins the group) and never commits.
    let group = format!("{}-dlq-inspect", cfg.kafka.group_id);
    let mut reader = Reader::open(cfg, &topic, &group, StartAt::Beginning, args.common.timeout)?;
    let mut progress = Progress::new(reader.total());
    let mut rows = Vec::new();
    let mut classes = ClassCounts::default();
    let mut total: u64 = 0;
    while let Some(record) = reader.next()? {
        total += 1;
        let letter = Letter::from_record(&record);
        let row = Row::new(&record, &letter);
        classes.add(row.error_class.as_deref());
        if rows.len() < args.limit {
            rows.push(row);
        }
        progress.update(total, "");
    }
    progress.finish();
    match args.format {
        Format::Json => print_json(&topic, total, &rows, &classes),
        Format::Table => print_table(&topic, total, &rows, &classes),
    }
    Ok(())
}

fn print_json(topic: &str, total: u64, rows: &[Row], classes: &ClassCounts) {
    let by_class: Vec<_> = classes
        .sorted()
        .into_iter()
        .map(|(c, n)| json!({ "error_class": c, "count": n }))
        .collect();
    let doc = json!({
        "dlq_topic": topic,
        "total": total,
        "shown": rows.len(),
        "records": rows,
        "by_error_class": by_class,
    });
    println!("{doc:#}");
}

fn print_table(topic: &str, total: u64, rows: &[Row], classes: &ClassCounts) {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    println!("DLQ {topic}: {total} dead letters (showing {})", rows.len());
    println!(
        "{:<5} {:<10} {:<40} {:<16} {:<6} {:<8} {:<7} VALUE",
        "PART", "OFFSET", "SOURCE (TOPIC/PARTITION/OFFSET)", "ERROR CLASS", "STATUS", "ATTEMPTS", "REPLAYS"
    );
    for r in rows {
        println!(
            "{:<5} {:<10} {:<40} {:<16} {:<6} {:<8} {:<7} {}",
            r.dlq_partition,
            r.dlq_offset,
            r.source,
            opt(r.error_class.clone()),
            opt(r.status.map(|s| s.to_string())),
            opt(r.attempts.map(|a| a.to_string())),
            opt(r.replay_count.map(|a| a.to_string())),
            r.value_preview
        );
    }
    println!();
    println!("by error class:");
    for (class, n) in classes.sorted() {
        println!("  {class:<40} {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_counts_keep_a_bounded_number_of_classes() {
        let mut c = ClassCounts::default();
        for i in 0..(MAX_CLASSES + 50) {
            c.add(Some(&format!("class-{i}")));
        }
        c.add(Some("class-0"));
        c.add(None);
        let sorted = c.sorted();
        assert_eq!(sorted.first(), Some(&("class-0".to_string(), 2)));
        assert_eq!(sorted.last(), Some(&("(other)".to_string(), 51)));
        assert_eq!(sorted.len(), MAX_CLASSES + 1);
    }
}
