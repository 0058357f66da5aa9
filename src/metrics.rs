//! All metrics, registered once, named `kafka_sidecar_<what>_<unit>[_total]`.
//! Labels are bounded: topic, partition, outcome, result — never keys or offsets.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::TraceContextExt;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::offsets::PartitionView;
use crate::record::Record;
use crate::retry::Transport;

/// Content type of [`Metrics::encode`]'s output: the classic Prometheus text format, which
/// every scraper and `promtool check metrics` accept. It has no exemplars.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Content type of [`Metrics::encode_openmetrics`]'s output: OpenMetrics 1.0, with the
/// latency histograms' exemplars (trace ids). Served to scrapers that ask for it (`Accept`).
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Exemplar labels of the latency histograms: the trace of the delivery observed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabels {
    /// W3C trace id, 32 lowercase hex digits.
    pub trace_id: String,
}

/// The exemplar for an observation made in `cx`: its trace id when the context is valid and
/// sampled, so the link leads to a trace that was (or, for the producer's part, may have
/// been) exported. `cx` is the delivery span's context: with export on, the sidecar's delivery
/// span (child of the record's `traceparent`); with export off, the record's `traceparent`
/// passed on unchanged; neither (no export, no or an unsampled `traceparent`): no exemplar.
pub fn trace_exemplar(cx: &opentelemetry::Context) -> Option<TraceLabels> {
    let span = cx.span();
    let sc = span.span_context();
    (sc.is_valid() && sc.is_sampled()).then(|| TraceLabels {
        trace_id: sc.trace_id().to_string(),
    })
}

/// Every `outcome` of `kafka_sidecar_records_total`.
pub const OUTCOMES: [&str; 7] = [
    "consumed",
    "delivered",
    "retried",
    "dead_lettered",
    "deduplicated",
    "headers_too_large",
    "retry_tier",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The record's own topic name (shared, not copied: this is looked up twice per record).
    pub topic: Arc<str>,
    /// consumed, delivered, retried, dead_lettered, deduplicated, headers_too_large.
    pub outcome: Cow<'static, str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// 2xx, 4xx, 5xx, timeout, unreachable, transport.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DedupLabels {
    /// claim, done or release.
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DlqErrorLabels {
    /// message_too_large, authorization, unknown_topic, invalid_record or transient.
    pub class: String,
}

/// A retry tier, by its topic (bounded: the configured tiers).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommitLabels {
    /// ok or error.
    pub result: String,
}

/// The sidecar's metrics.
pub struct Metrics {
    registry: Registry,
    pub records: Family<OutcomeLabels, Counter>,
    pub delivery_seconds: Family<ResultLabels, HistogramWithExemplars<TraceLabels>>,
    pub end_to_end_seconds: HistogramWithExemplars<TraceLabels>,
    pub in_flight_records: Gauge,
    pub in_flight_bytes: Gauge,
    pub paused_partitions: Gauge,
    pub assigned_partitions: Gauge,
    pub rebalances: Counter,
    pub commits: Family<CommitLabels, Counter>,
    pub lag_records: Family<PartitionLabels, Gauge>,
    pub lag_seconds: Family<PartitionLabels, Gauge<f64, AtomicU64>>,
    pub committed_offset: Family<PartitionLabels, Gauge<i64, AtomicI64>>,
    pub rate_limit_wait_seconds: Counter<f64, AtomicU64>,
    pub concurrency_limit: Gauge,
    pub breaker_state: Gauge,
    pub ready: Gauge,
    pub kafka_connected: Gauge,
    pub batch_size: Histogram,
    pub dedup_seconds: Family<DedupLabels, Histogram>,
    pub dedup_errors: Family<DedupLabels, Counter>,
    pub dedup_bypassed: Counter,
    pub dedup_key_fallbacks: Counter,
    pub dlq_errors: Family<DlqErrorLabels, Counter>,
    pub dlq_values_dropped: Counter,
    pub dlq_blocked_records: Gauge,
    /// Delivery jobs that panicked (each panic once); their records are run again or dead-lettered.
    pub job_panics: Counter,
    pub retry_tier_sent: Family<TierLabels, Counter>,
    pub retry_tier_delivered: Family<TierLabels, Counter>,
    pub retry_tier_lag_records: Family<TierLabels, Gauge>,
    pub retry_tier_lag_seconds: Family<TierLabels, Gauge<f64, AtomicU64>>,
    /// The configured retry tiers (topic, delay), for the tier lag gauges.
    retry_tiers: Mutex<Vec<(String, Duration)>>,
    shown_partitions: Mutex<HashSet<PartitionLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kafka_sidecar");
        let records = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "records",
            "Records by topic and outcome (consumed, delivered, retried, dead_lettered, deduplicated, headers_too_large)",
            records.clone(),
        );
        let delivery_seconds =
            Family::<ResultLabels, HistogramWithExemplars<TraceLabels>>::new_with_constructor(|| {
                HistogramWithExemplars::new(exponential_buckets(0.001, 2.0, 16))
            });
        registry.register(
            "delivery_duration_seconds",
            "Duration of requests to the app, by result",
            delivery_seconds.clone(),
        );
        let end_to_end_seconds = HistogramWithExemplars::new(exponential_buckets(0.005, 2.0, 18));
        registry.register(
            "end_to_end_latency_seconds",
            "Time from the record timestamp until it is finished",
            end_to_end_seconds.clone(),
        );
        let in_flight_records = Gauge::default();
        registry.register(
            "in_flight_records",
            "Records read and not yet finished",
            in_flight_records.clone(),
        );
        let in_flight_bytes = Gauge::default();
        registry.register(
            "in_flight_bytes",
            "Bytes of records read and not yet finished",
            in_flight_bytes.clone(),
        );
        let paused_partitions = Gauge::default();
        registry.register(
            "paused_partitions",
            "Partitions paused by backpressure",
            paused_partitions.clone(),
        );
        let assigned_partitions = Gauge::default();
        registry.register(
            "assigned_partitions",
            "Partitions assigned to this member",
            assigned_partitions.clone(),
        );
        let rebalances = Counter::default();
        registry.register("rebalances", "Rebalance events (assign or revoke)", rebalances.clone());
        let commits = Family::<CommitLabels, Counter>::default();
        registry.register("commits", "Offset commits by result", commits.clone());
        let lag_records = Family::<PartitionLabels, Gauge>::default();
        registry.register(
            "consumer_lag_records",
            "High watermark minus committed position",
            lag_records.clone(),
        );
        let lag_seconds = Family::<PartitionLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "consumer_lag_seconds",
            "Age of the oldest unfinished record",
            lag_seconds.clone(),
        );
        let committed_offset = Family::<PartitionLabels, Gauge<i64, AtomicI64>>::default();
        registry.register("committed_offset", "Last committed position", committed_offset.clone());
        let rate_limit_wait_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "rate_limit_wait_seconds",
            "Time deliveries waited for the breaker, rate limit and concurrency gate",
            rate_limit_wait_seconds.clone(),
        );
        let concurrency_limit = Gauge::default();
        registry.register(
            "concurrency_limit",
            "Current adaptive limit of concurrent deliveries",
            concurrency_limit.clone(),
        );
        let breaker_state = Gauge::default();
        registry.register(
            "breaker_state",
            "Circuit breaker on the app: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        let ready = Gauge::default();
        registry.register("ready", "1 when /readyz answers 200", ready.clone());
        let kafka_connected = Gauge::default();
        registry.register(
            "kafka_connected",
            "1 while the Kafka brokers answer, 0 while they cannot be reached (or not yet)",
            kafka_connected.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "batch_size_records",
            "Records per request to the app (1 in single mode)",
            batch_size.clone(),
        );
        let dedup_seconds = Family::<DedupLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        registry.register(
            "dedup_duration_seconds",
            "Round trips to the dedup store (one per job), by operation",
            dedup_seconds.clone(),
        );
        let dedup_errors = Family::<DedupLabels, Counter>::default();
        registry.register(
            "dedup_errors",
            "Failed dedup store operations (Redis unavailable or timed out), by operation",
            dedup_errors.clone(),
        );
        let dedup_bypassed = Counter::default();
        registry.register(
            "dedup_bypassed",
            "Records delivered without dedup because Redis was unavailable (dedup.on_error = \"deliver\")",
            dedup_bypassed.clone(),
        );
        let dedup_key_fallbacks = Counter::default();
        registry.register(
            "dedup_key_fallbacks",
            "Records whose configured idempotency key source was missing, so the offset was used",
            dedup_key_fallbacks.clone(),
        );
        let dlq_errors = Family::<DlqErrorLabels, Counter>::default();
        registry.register(
            "dlq_errors",
            "Failed writes to the dead-letter topic, by class (message_too_large, authorization, unknown_topic, invalid_record, transient)",
            dlq_errors.clone(),
        );
        let dlq_values_dropped = Counter::default();
        registry.register(
            "dlq_values_dropped",
            "Records dead-lettered without their value (header x-dlq-dropped) because they were too large for the DLQ topic",
            dlq_values_dropped.clone(),
        );
        let dlq_blocked_records = Gauge::default();
        registry.register(
            "dlq_blocked_records",
            "Records kept unfinished because the dead-letter topic refuses them (unknown topic, authorization, ...)",
            dlq_blocked_records.clone(),
        );
        let job_panics = Counter::default();
        registry.register(
            "job_panics",
            "Delivery jobs that panicked (a bug): their records are run again, then dead-lettered with error class panic",
            job_panics.clone(),
        );
        let retry_tier_sent = Family::<TierLabels, Counter>::default();
        registry.register(
            "retry_tier_sent",
            "Records written to each retry tier topic after their attempts failed",
            retry_tier_sent.clone(),
        );
        let retry_tier_delivered = Family::<TierLabels, Counter>::default();
        registry.register(
            "retry_tier_delivered",
            "Records delivered to the app from each retry tier topic",
            retry_tier_delivered.clone(),
        );
        let retry_tier_lag_records = Family::<TierLabels, Gauge>::default();
        registry.register(
            "retry_tier_lag_records",
            "Records in each retry tier not yet finished (assigned partitions of the tier topic)",
            retry_tier_lag_records.clone(),
        );
        let retry_tier_lag_seconds = Family::<TierLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "retry_tier_lag_seconds",
            "How far each retry tier is behind its schedule: age of its oldest unfinished record minus the tier's delay (0 when on time)",
            retry_tier_lag_seconds.clone(),
        );
        Self {
            retry_tier_sent,
            retry_tier_delivered,
            retry_tier_lag_records,
            retry_tier_lag_seconds,
            retry_tiers: Mutex::new(Vec::new()),
            dlq_errors,
            dlq_values_dropped,
            dlq_blocked_records,
            job_panics,
            batch_size,
            dedup_seconds,
            dedup_errors,
            dedup_bypassed,
            dedup_key_fallbacks,
            registry,
            rate_limit_wait_seconds,
            concurrency_limit,
            breaker_state,
            ready,
            kafka_connected,
            records,
            delivery_seconds,
            end_to_end_seconds,
            in_flight_records,
            in_flight_bytes,
            paused_partitions,
            assigned_partitions,
            rebalances,
            commits,
            lag_records,
            lag_seconds,
            committed_offset,
            shown_partitions: Mutex::new(HashSet::new()),
        }
    }

    /// The Prometheus text exposition (format 0.0.4, no exemplars).
    pub fn encode(&self) -> String {
        openmetrics_to_prometheus(&self.encode_openmetrics())
    }

    /// The OpenMetrics 1.0 exposition, with exemplars.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "failed to encode metrics");
        }
        out
    }

    pub fn record_outcome(&self, record: &Record, outcome: impl Into<Cow<'static, str>>) {
        self.count_outcome(&record.topic, outcome, 1);
    }

    /// Records finished together (delivered, dead-lettered, ...; one job's), each with its
    /// outcome and exemplar (see [`trace_exemplar`]): `records_total` counted once per run of
    /// records with the same topic and outcome (a batch is mostly one run), and the end-to-end
    /// latency observed against one clock read for all.
    pub fn records_finished<'r>(
        &self,
        finished: impl IntoIterator<Item = (&'r Record, &'static str, Option<TraceLabels>)>,
    ) {
        let now = SystemTime::now();
        let now_ms = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut run: Option<(&Arc<str>, &'static str, u64)> = None;
        for (record, outcome, exemplar) in finished {
            match &mut run {
                Some((topic, o, n)) if Arc::ptr_eq(topic, &record.topic) && *o == outcome => *n += 1,
                _ => {
                    if let Some((topic, o, n)) = run.replace((&record.topic, outcome, 1)) {
                        self.count_outcome(topic, o, n);
                    }
                }
            }
            if let Some(ts) = record.timestamp_ms {
                self.end_to_end_seconds
                    .observe((now_ms - ts).max(0) as f64 / 1000.0, exemplar, Some(now));
            }
        }
        if let Some((topic, o, n)) = run {
            self.count_outcome(topic, o, n);
        }
    }

    /// Counts `n` records of `topic` with this outcome in `records_total`.
    pub fn count_outcome(&self, topic: &Arc<str>, outcome: impl Into<Cow<'static, str>>, n: u64) {
        self.records
            .get_or_create(&OutcomeLabels {
                topic: topic.clone(),
                outcome: outcome.into(),
            })
            .inc_by(n);
    }

    /// One request to the app took `took`; `exemplar`: see [`trace_exemplar`] (a batch passes
    /// its first record's).
    pub fn observe_delivery(&self, took: Duration, t: &Transport, exemplar: Option<TraceLabels>) {
        let result = match t {
            Transport::Status { status, .. } => format!("{}xx", status / 100),
            Transport::Timeout => "timeout".into(),
            Transport::Unreachable(_) => "unreachable".into(),
            Transport::Failed(_) => "transport".into(),
        };
        self.delivery_seconds.get_or_create(&ResultLabels { result }).observe(
            took.as_secs_f64(),
            exemplar,
            Some(SystemTime::now()),
        );
    }

    /// The configured retry tiers (topic, delay): their gauges start at 0.
    pub fn set_retry_tiers(&self, tiers: Vec<(String, Duration)>) {
        for (topic, _) in &tiers {
            let labels = TierLabels { tier: topic.clone() };
            self.retry_tier_lag_records.get_or_create(&labels).set(0);
            self.retry_tier_lag_seconds.get_or_create(&labels).set(0.0);
            let _ = self.retry_tier_sent.get_or_create(&labels);
            let _ = self.retry_tier_delivered.get_or_create(&labels);
        }
        *self.retry_tiers.lock().unwrap_or_else(|e| e.into_inner()) = tiers;
    }

    /// A record was written to the retry tier `topic`.
    pub fn retry_tier_sent(&self, topic: &str) {
        self.retry_tier_sent
            .get_or_create(&TierLabels {
                tier: topic.to_string(),
            })
            .inc();
    }

    /// A record read from the retry tier `topic` was delivered.
    pub fn retry_tier_delivered(&self, topic: &str) {
        self.retry_tier_delivered
            .get_or_create(&TierLabels {
                tier: topic.to_string(),
            })
            .inc();
    }

    /// Tier lag from the partition views: records not finished, and how far the oldest of
    /// them is past its tier's delay.
    fn set_tier_lag(&self, views: &[PartitionView]) {
        let tiers = self.retry_tiers.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, delay) in tiers.iter() {
            let of_tier = views.iter().filter(|v| &*v.tp.topic == topic.as_str());
            let (records, seconds) = of_tier.fold((0i64, 0f64), |(n, s), v| {
                let behind = (v.lag_seconds - delay.as_secs_f64()).max(0.0);
                (n.saturating_add(v.lag.unwrap_or(0).max(0)), s.max(behind))
            });
            let labels = TierLabels { tier: topic.clone() };
            self.retry_tier_lag_records.get_or_create(&labels).set(records);
            self.retry_tier_lag_seconds.get_or_create(&labels).set(seconds);
        }
    }

    /// The record counters of a topic seen for the first time start at 0 for every outcome,
    /// so `increase()` in an alert sees the first dead letter (a series born at 1 has no rise).
    /// Per-partition lag and committed offsets; partitions no longer assigned disappear.
    pub fn set_partitions(&self, views: &[PartitionView]) {
        self.set_tier_lag(views);
        let mut shown = self.shown_partitions.lock().unwrap_or_else(|e| e.into_inner());
        let mut now = HashSet::new();
        for v in views {
            let labels = PartitionLabels {
                topic: v.tp.topic.to_string(),
                partition: v.tp.partition.to_string(),
            };
            if let Some(lag) = v.lag {
                self.lag_records.get_or_create(&labels).set(lag);
            }
            self.lag_seconds.get_or_create(&labels).set(v.lag_seconds);
            if let Some(c) = v.committed {
                self.committed_offset.get_or_create(&labels).set(c);
            }
            now.insert(labels);
        }
        let known: HashSet<&str> = shown.iter().map(|l| l.topic.as_str()).collect();
        let fresh: HashSet<&str> = now
            .iter()
            .map(|l| l.topic.as_str())
            .filter(|t| !known.contains(t))
            .collect();
        for topic in fresh {
            for outcome in OUTCOMES {
                drop(self.records.get_or_create(&OutcomeLabels {
                    topic: topic.into(),
                    outcome: Cow::Borrowed(outcome),
                }));
            }
        }
        for gone in shown.difference(&now) {
            self.lag_records.remove(gone);
            self.lag_seconds.remove(gone);
            self.committed_offset.remove(gone);
        }
        *shown = now;
    }

    pub fn commit(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.commits
            .get_or_create(&CommitLabels { result: result.into() })
            .inc();
    }
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples `x_total`.
/// The classic text format names the family `x_total`, has no `# EOF`/`# UNIT` lines and no
/// exemplars (` # {trace_id="..."} value timestamp` after a sample; label values here are
/// topic names and fixed words, which never contain ` # {`).
fn openmetrics_to_prometheus(text: &str) -> String {
    let counters: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
        });
        let line = match line.split_once(" # {") {
            Some((sample, _exemplar)) if !line.starts_with('#') => sample,
            _ => line,
        };
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_with_total_in_the_classic_format() {
        let m = Metrics::new();
        m.commit(true);
        let text = m.encode();
        assert!(text.contains("# TYPE kafka_sidecar_commits_total counter"), "{text}");
        assert!(text.contains("kafka_sidecar_commits_total{result=\"ok\"} 1"), "{text}");
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn a_topic_s_record_counters_start_at_zero_once_it_is_assigned() {
        let m = Metrics::new();
        let view = |p| PartitionView {
            tp: crate::offsets::TopicPartition::new("orders", p),
            next: None,
            position: None,
            committed: None,
            pending: 0,
            high_watermark: None,
            lag: None,
            lag_seconds: 0.0,
        };
        m.set_partitions(&[view(0), view(1)]);
        m.records
            .get_or_create(&OutcomeLabels {
                topic: "orders".into(),
                outcome: "dead_lettered".into(),
            })
            .inc();
        m.set_partitions(&[view(0), view(1)]);
        let text = m.encode();
        for outcome in OUTCOMES {
            let want = if outcome == "dead_lettered" { 1 } else { 0 };
            let line = format!("kafka_sidecar_records_total{{topic=\"orders\",outcome=\"{outcome}\"}} {want}");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
    }

    #[test]
    fn records_finished_together_are_counted_per_topic_and_outcome_and_each_observed() {
        let m = Metrics::new();
        let record = |topic: &Arc<str>, ts| Record {
            topic: topic.clone(),
            partition: 0,
            offset: 0,
            timestamp_ms: ts,
            key: None,
            value: None,
            headers: Vec::new(),
            generation: 0,
        };
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let a_again: Arc<str> = "a".into();
        let now_ms = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let job = [
            (record(&a, Some(now_ms - 1_000)), "delivered"),
            (record(&a, Some(now_ms - 1_000)), "delivered"),
            (record(&b, None), "delivered"),
            (record(&a, Some(now_ms - 1_000)), "dead_lettered"),
            (record(&a_again, Some(now_ms - 1_000)), "dead_lettered"),
            (record(&a, Some(now_ms - 1_000)), "delivered"),
        ];
        m.records_finished(job.iter().map(|(r, o)| (r, *o, None)));
        let text = m.encode();
        for (topic, outcome, n) in [("a", "delivered", 3), ("a", "dead_lettered", 2), ("b", "delivered", 1)] {
            let line = format!("kafka_sidecar_records_total{{topic=\"{topic}\",outcome=\"{outcome}\"}} {n}");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        // Five records had a timestamp, each a second old (against the one clock read).
        let value = |name: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap_or_default();
            line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
        };
        assert_eq!(value("kafka_sidecar_end_to_end_latency_seconds_count"), 5.0, "{text}");
        let sum = value("kafka_sidecar_end_to_end_latency_seconds_sum");
        assert!(
            (5.0..6.0).contains(&sum),
            "five records a second old: sum {sum} in\n{text}"
        );
    }

    fn sampled(trace_id: &str, sampled: bool) -> opentelemetry::Context {
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let sc = SpanContext::new(
            TraceId::from_hex(trace_id).unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            flags,
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn a_sampled_trace_gives_an_exemplar_an_unsampled_or_missing_one_none() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            trace_exemplar(&sampled(id, true)).map(|l| l.trace_id),
            Some(id.to_string())
        );
        assert_eq!(trace_exemplar(&sampled(id, false)), None);
        assert_eq!(trace_exemplar(&opentelemetry::Context::new()), None);
    }

    #[test]
    fn latency_exemplars_are_in_openmetrics_only() {
        let m = Metrics::new();
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let ok = Transport::Status {
            status: 200,
            retry_after: None,
        };
        m.observe_delivery(Duration::from_millis(3), &ok, trace_exemplar(&sampled(id, true)));
        let om = m.encode_openmetrics();
        let bucket = om
            .lines()
            .find(|l| l.contains("delivery_duration_seconds_bucket") && l.contains(" # {"))
            .unwrap_or_else(|| panic!("no exemplar:\n{om}"));
        assert!(bucket.contains(&format!("# {{trace_id=\"{id}\"}} 0.003 ")), "{bucket}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        let text = m.encode();
        assert!(
            text.contains("kafka_sidecar_delivery_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(!text.contains("trace_id") && !text.contains(" # "), "{text}");
    }
}
