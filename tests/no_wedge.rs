//! No panic, no wedge: shutdown during a rebalance honours the grace period and still commits
//! and leaves the group; a delivery that panics neither wedges its lane nor drops its record.
//! Real broker, real HTTP app; the shutdown test runs the real binary.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kafka_sidecar::breaker::Breaker;
use kafka_sidecar::config::{Config, DeliveryMode, Ordering};
use kafka_sidecar::delivery::AppClient;
use kafka_sidecar::dlq::DeadLetters;
use kafka_sidecar::metrics::Metrics;
use kafka_sidecar::offsets::{OffsetTracker, TopicPartition};
use kafka_sidecar::pipeline::{InFlight, Input, JobRunner};
use kafka_sidecar::ratelimit::RateLimiter;
use kafka_sidecar::record::Record;
use kafka_sidecar::scheduler::{Scheduler, Settings};
use kafka_sidecar::worker::Worker;
use tokio_util::sync::CancellationToken;

const MINUTE: Duration = Duration::from_secs(60);

const PARTITIONS: i32 = 4;
/// The app's time per record: with one lane per partition, a partition of 50 records takes 20 s.
const DELAY: Duration = Duration::from_millis(400);

/// A topic of `per_partition` records on each of 4 partitions, a slow app, and the config of a
/// member with `revoke_drain_timeout = 60s`, the given grace period and one lane per
/// partition (what a partition finished is then a prefix, so a commit covers all of it).
async fn slow_setup(per_partition: i64, grace: &str) -> (String, TestApp, SidecarConfig, String) {
    let topic = unique("term-revoke");
    create_topic(&topic, PARTITIONS).await;
    let records = (0..PARTITIONS)
        .flat_map(|p| {
            (0..per_partition).map(move |i| Out {
                key: None,
                value: format!("p{p}-{i}"),
                partition: Some(p),
                headers: vec![],
            })
        })
        .collect();
    produce(&topic, records).await;
    let app = TestApp::start(|_| Answer {
        delay: DELAY,
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.ordering = "partition";
    let toml = cfg
        .toml()
        .replace(
            "session_timeout = \"10s\"",
            "session_timeout = \"10s\"\nrevoke_drain_timeout = \"60s\"",
        )
        .replace("grace_period = \"15s\"", &format!("grace_period = \"{grace}\""));
    (topic, app, cfg, toml)
}

fn revoked_in(log: &str, topic: &str) -> bool {
    log.lines()
        .any(|l| l.contains("partitions revoked") && l.contains(topic) && !l.contains("partitions= "))
}

/// Waits until the second member owns everything and finished the topic, then checks that no
/// record the app had answered before `committed_by` was delivered twice.
async fn assert_finished_work_was_committed(
    app: &TestApp,
    cfg: &SidecarConfig,
    per_partition: i64,
    committed_by: Instant,
) {
    let total = (PARTITIONS as i64 * per_partition) as usize;
    let distinct = || app.delivered().iter().map(|r| r.id()).collect::<HashSet<_>>().len();
    assert!(
        wait_until(2 * MINUTE, || distinct() >= total).await,
        "only {} of {total} records delivered",
        distinct()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &cfg.topic, PARTITIONS, MINUTE).await;
    assert_eq!(committed, ends);
    let delivered = app.delivered();
    let mut times: HashMap<(i32, i64), usize> = HashMap::new();
    for r in &delivered {
        *times.entry(r.id()).or_default() += 1;
    }
    let finished: HashSet<(i32, i64)> = delivered
        .iter()
        .filter(|r| r.at + DELAY < committed_by)
        .map(|r| r.id())
        .collect();
    let again: Vec<_> = finished.iter().filter(|id| times[id] > 1).collect();
    assert!(
        again.is_empty(),
        "records finished before the shutdown's commit were delivered again ((partition, offset)): {again:?}"
    );
}

/// SIGTERM while the member is inside a revoke callback waiting for a slow app, with
/// `revoke_drain_timeout = 60s` and `grace_period = 5s`: the revoke wait is cut at the
/// shutdown deadline, so the member exits 0 in time *and* commits what it finished and leaves
/// the group. (Before, it waited in the callback past the grace period and exited without the
/// final commit: everything finished during the revoke was delivered again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_revoke_drain_exits_in_the_grace_period_and_commits_what_was_finished() {
    require_kafka();
    let (topic, app, cfg, toml) = slow_setup(50, "5s").await;
    let mut first = Sidecar::start_toml(&toml);
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 4).await,
        "stream did not start"
    );
    let _second = Sidecar::start_toml(&toml);
    assert!(
        wait_until(MINUTE, || revoked_in(&first.log(), &topic)).await,
        "the second member did not cause a revoke on the first"
    );
    let revoking = Instant::now();
    // The revoked partitions hold ~20 s of work at this app's pace (it was all read at once):
    // the first member stays in the revoke callback while records keep finishing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sigterm = Instant::now();
    first.signal(nix::sys::signal::Signal::SIGTERM);
    let status = first
        .wait_exit(Duration::from_secs(5 + 10))
        .await
        .expect("exits within the grace period (plus a margin), not after revoke_drain_timeout");
    assert!(status.success(), "exit status {status:?}\n{}", first.log());
    let log = first.log();
    assert!(
        log.contains("revoke drain cut short by the shutdown deadline"),
        "the revoke wait ended at the shutdown deadline:\n{log}"
    );
    assert!(log.contains("Kafka consumer closed"), "left the group:\n{log}");
    let during_revoke = app
        .delivered()
        .iter()
        .filter(|r| r.at > revoking && r.at + DELAY < sigterm)
        .count();
    assert!(
        during_revoke > 0,
        "the test needs records finished while the first member was in the revoke callback"
    );
    // The second member takes everything over and finishes the topic; whatever the app had
    // answered before the SIGTERM was committed: never delivered again.
    assert_finished_work_was_committed(&app, &cfg, 50, sigterm).await;
}

/// A revoke that arrives while the shutdown drains (a member joined just after SIGTERM) waits
/// no longer than the drain, not `revoke_drain_timeout`: exit 0 within the grace period, and
/// what was finished during the drain is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_during_the_shutdown_drain_honours_the_grace_period() {
    require_kafka();
    // 40 s of work per partition, a 16 s grace period: the drain (12 s) cannot finish it.
    let (topic, app, cfg, toml) = slow_setup(100, "16s").await;
    let mut first = Sidecar::start_toml(&toml);
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 4).await,
        "stream did not start"
    );
    let sigterm = Instant::now();
    first.signal(nix::sys::signal::Signal::SIGTERM);
    let _second = Sidecar::start_toml(&toml);
    let status = first
        .wait_exit(Duration::from_secs(16 + 10))
        .await
        .expect("exits within the grace period (plus a margin), not after revoke_drain_timeout");
    assert!(status.success(), "exit status {status:?}\n{}", first.log());
    let log = first.log();
    let during_drain = log
        .lines()
        .skip_while(|l| !l.contains("shutting down: finishing records already read"))
        .take_while(|l| !l.contains("closing the Kafka consumer"))
        .any(|l| l.contains("partitions revoked") && l.contains(&topic) && !l.contains("partitions= "));
    assert!(
        during_drain,
        "the second member caused a revoke during the drain:\n{log}"
    );
    assert!(
        log.contains("revoke drain cut short by the shutdown deadline"),
        "the revoke wait ended at the shutdown deadline:\n{log}"
    );
    assert!(log.contains("Kafka consumer closed"), "left the group:\n{log}");
    // Finished up to a margin before the drain's end (12 s after SIGTERM): committed.
    assert_finished_work_was_committed(&app, &cfg, 100, sigterm + Duration::from_secs(10)).await;
}

/// Wraps the real worker and panics on one offset, as a bug on some input would.
struct PanicsOn {
    worker: Worker,
    offset: i64,
}

impl JobRunner for PanicsOn {
    async fn run(&self, job: &[Record]) {
        if job.iter().any(|r| r.offset == self.offset) {
            panic!("delivery bug on offset {}", self.offset);
        }
        self.worker.deliver(job).await;
    }

    async fn after_panic(&self, job: &[Record], panics: u32, message: &str) -> bool {
        JobRunner::after_panic(&self.worker, job, panics, message).await
    }
}

/// A worker as the sidecar builds it (no dedup), on this config.
fn worker(cfg: &Config, tracker: &Arc<OffsetTracker>, metrics: &Arc<Metrics>, hard_stop: &CancellationToken) -> Worker {
    Worker {
        app: AppClient::new(&cfg.app, &cfg.kafka.group_id).unwrap(),
        dlq: DeadLetters::from_config(cfg, metrics.clone()).unwrap(),
        tracker: tracker.clone(),
        retry: cfg.retry.clone(),
        metrics: metrics.clone(),
        breaker: Arc::new(Breaker::new(cfg.breaker.clone())),
        limiter: RateLimiter::new(&cfg.rate_limit, 2),
        group: cfg.kafka.group_id.clone(),
        hard_stop: hard_stop.clone(),
        dedup: None,
        key_source: cfg.dedup.key_source(),
        tiers: None,
    }
}

fn panic_config(app: &TestApp) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers();
    cfg.kafka.group_id = unique("group");
    cfg.app.url = app.url();
    cfg.retry.max_attempts = 3;
    cfg.retry.initial_backoff = Duration::from_millis(10);
    cfg.retry.max_backoff = Duration::from_millis(100);
    cfg
}

/// Starts a scheduler (partition ordering, single mode) on `runner` and hands it records
/// 0..`records` of partition 0 of `topic`, read through `tracker` as the poll thread would.
async fn feed(
    runner: PanicsOn,
    tracker: &OffsetTracker,
    topic: &str,
    records: i64,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::Sender<Input>,
    Arc<InFlight>,
) {
    let settings = Settings {
        ordering: Ordering::Partition,
        mode: DeliveryMode::Single,
        workers: 2,
        batch: Default::default(),
    };
    let in_flight = Arc::new(InFlight::default());
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let scheduler = tokio::spawn(Scheduler::new(settings, Arc::new(runner), in_flight.clone()).run(rx));
    let tp = TopicPartition::new(topic, 0);
    tracker.assign(std::slice::from_ref(&tp));
    for offset in 0..records {
        let record = Record {
            topic: topic.into(),
            partition: 0,
            offset,
            timestamp_ms: None,
            key: Some(bytes::Bytes::from(format!("k{offset}"))),
            value: Some(bytes::Bytes::from(format!("v{offset}"))),
            headers: Vec::new(),
            generation: tracker.read(&tp, offset, None),
        };
        in_flight.add(record.size());
        tx.send(Input::Records(vec![record])).await.unwrap();
    }
    (scheduler, tx, in_flight)
}

/// A record whose delivery panics is run again, then dead-lettered with error class `panic`;
/// its lane goes on with the next record, the offsets commit past it, and each panic is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_delivery_panics_is_dead_lettered_and_its_lane_goes_on() {
    require_kafka();
    let topic = unique("panics");
    let dlq = unique("panics-dlq");
    create_topic(&dlq, 1).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = panic_config(&app);
    cfg.dlq.topic = dlq.clone();
    let (metrics, tracker) = (Arc::new(Metrics::new()), Arc::new(OffsetTracker::default()));
    let runner = PanicsOn {
        worker: worker(&cfg, &tracker, &metrics, &CancellationToken::new()),
        offset: 1,
    };
    let (scheduler, tx, in_flight) = feed(runner, &tracker, &topic, 3).await;
    tx.send(Input::End).await.unwrap();
    tokio::time::timeout(MINUTE, scheduler)
        .await
        .expect("the scheduler finished: nothing wedged")
        .expect("the scheduler itself did not panic");

    let offsets: Vec<i64> = app.delivered().iter().map(|r| r.offset).collect();
    assert_eq!(offsets, [0, 2], "the lane went on after the panicking record");
    let dead = read_all(&dlq, 1);
    assert_eq!(dead.len(), 1, "the panicking record is dead-lettered once");
    assert_eq!(dead[0].value.as_deref(), Some(&b"v1"[..]));
    assert_eq!(dead[0].headers["x-dlq-error-class"], "panic");
    assert_eq!(dead[0].headers["x-dlq-source-offset"], "1");
    assert!(
        dead[0].headers["x-dlq-error-message"].contains("delivery bug on offset 1"),
        "{:?}",
        dead[0].headers
    );
    let tp = TopicPartition::new(topic.as_str(), 0);
    assert_eq!(tracker.positions_to_commit(), vec![(tp, 3)], "commits pass it");
    assert_eq!(in_flight.get(), (0, 0));
    assert_eq!(
        metric(&metrics.encode(), "kafka_sidecar_job_panics_total", &[]),
        Some(3.0),
        "one per panic (retry.max_attempts = 3)"
    );
}

/// Without a DLQ there is nowhere safe to put a record that keeps panicking: it is run again
/// at the maximum backoff, blocks only its lane, is never committed, and shutdown's hard stop
/// still ends its job (the slot and in-flight count are released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dlq_a_record_that_keeps_panicking_blocks_its_lane_uncommitted_until_the_hard_stop() {
    let app = TestApp::start(|_| Answer::ok()).await;
    let cfg = panic_config(&app);
    let (metrics, tracker) = (Arc::new(Metrics::new()), Arc::new(OffsetTracker::default()));
    let hard_stop = CancellationToken::new();
    let runner = PanicsOn {
        worker: worker(&cfg, &tracker, &metrics, &hard_stop),
        offset: 0,
    };
    let (scheduler, tx, in_flight) = feed(runner, &tracker, "no-dlq", 2).await;
    let panics = || metric(&metrics.encode(), "kafka_sidecar_job_panics_total", &[]).unwrap_or(0.0);
    assert!(
        wait_until(MINUTE, || panics() >= 6.0).await,
        "kept running it after retry.max_attempts = 3 panics ({} so far)",
        panics()
    );
    assert_eq!(app.delivered_count(), 0, "offset 1 waits behind offset 0 in its lane");
    let tp = TopicPartition::new("no-dlq", 0);
    assert_eq!(
        tracker.positions_to_commit(),
        vec![(tp.clone(), 0)],
        "nothing committed past it"
    );

    hard_stop.cancel();
    tx.send(Input::End).await.unwrap();
    tokio::time::timeout(MINUTE, scheduler)
        .await
        .expect("the hard stop ends the job")
        .expect("the scheduler itself did not panic");
    assert_eq!(in_flight.get(), (0, 0));
    assert_eq!(tracker.positions_to_commit(), vec![(tp, 0)], "abandoned, not committed");
}
