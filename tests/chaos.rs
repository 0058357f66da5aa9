//! The chaos suite: the real binary as child processes, the real broker and Redis, a real HTTP
//! app, a producer writing throughout, and faults injected at random moments.
//!
//! Every scenario ends with the same invariant check over every record produced (see
//! [`check`]): each was delivered (2xx) at least once or is in the DLQ with `x-dlq-*` headers
//! naming its source topic, partition and offset; the group's committed offsets reach the end;
//! duplicates are counted. Each scenario prints one summary line (also when it passes: see
//! [`summary`]) and asserts its own promise (0 lost, 0 duplicates, ...).
//!
//! Random moments come from a seed printed in the summary line and in failure messages;
//! `CHAOS_SEED=<n> cargo test --test chaos <scenario>` replays the same moments.
//! Scenarios run one at a time (they share two cores with their sidecars and measure progress).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::kafka_server::TestKafka;
use common::redis_server::TestRedis;
use common::*;
use nix::sys::signal::Signal;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

const MINUTE: Duration = Duration::from_secs(60);
/// `shutdown.grace_period` in [`SidecarConfig::toml`].
const GRACE: Duration = Duration::from_secs(15);

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- random moments ---------------------------------------------------------------------------

/// `CHAOS_SEED` if set, else a fresh one; always printed.
fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(rand::random)
}

fn millis(rng: &mut StdRng, range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rng.random_range(range))
}

// ---- the producer -------------------------------------------------------------------------------

/// Delivery reports of the stream's producer, counted.
#[derive(Default)]
struct AckCounts {
    acked: AtomicUsize,
    failed: Mutex<Vec<String>>,
}

/// The producer's context: it counts delivery reports where the stream can read them.
struct Acks(Arc<AckCounts>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.0.acked.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => self.0.failed.lock().unwrap().push(e.to_string()),
        }
    }
}

/// A producer task writing records throughout a scenario: `rate` records per second, up to
/// `max`, keys `k0`..`k39`, values `r<n>` (or `poison-<n>` for every `poison_every`-th record).
/// Idempotent with `acks=all` and a long message timeout, so it rides out a broker outage.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    acks: Arc<AckCounts>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Stream {
    fn start(bootstrap: &str, topic: &str, rate: u64, max: usize, poison_every: Option<usize>) -> Stream {
        let acks = Arc::new(AckCounts::default());
        let producer: BaseProducer<Acks> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create_with_context(Acks(acks.clone()))
            .expect("stream producer");
        let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (topic, s, n) = (topic.to_string(), stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut i = 0usize;
            while i < max && !s.load(Ordering::Relaxed) {
                // Keep to the rate: send what is due, then let librdkafka work for a moment.
                let due = ((started.elapsed().as_millis() as u64 * rate / 1000) as usize).min(max);
                while i < due {
                    let value = match poison_every {
                        Some(every) if i % every == every - 1 => format!("poison-{i}"),
                        _ => format!("r{i}"),
                    };
                    let key = format!("k{}", i % 40);
                    let rec = BaseRecord::to(&topic).key(&key).payload(&value);
                    send_when_queue_has_room(&producer, rec, Duration::from_millis(20));
                    i += 1;
                    n.store(i, Ordering::Relaxed);
                }
                producer.poll(Duration::from_millis(10));
            }
            producer.flush(Duration::from_secs(300)).expect("flush the stream");
            i
        });
        Stream {
            stop,
            sent,
            acks,
            thread: Some(thread),
        }
    }

    /// Records handed to the producer so far.
    fn sent(&self) -> usize {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops writing, waits for every record to be acknowledged; returns how many were written.
    async fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("stream running");
        let sent = tokio::task::spawn_blocking(move || thread.join().expect("stream thread"))
            .await
            .unwrap();
        let failed = self.acks.failed.lock().unwrap().clone();
        assert!(failed.is_empty(), "the stream failed to produce: {failed:?}");
        assert_eq!(
            self.acks.acked.load(Ordering::Relaxed),
            sent,
            "every record acknowledged"
        );
        sent
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---- reading back -------------------------------------------------------------------------------

// ---- the invariant checker ----------------------------------------------------------------------

/// What one scenario ran against.
struct Target<'a> {
    scenario: &'a str,
    seed: u64,
    bootstrap: String,
    topic: &'a str,
    partitions: i32,
    group: &'a str,
    dlq: Option<&'a str>,
}

/// The outcome over every record produced.
#[derive(Debug)]
struct Tally {
    produced: usize,
    /// Records delivered (2xx) at least once.
    delivered: usize,
    /// Records in the DLQ.
    dead_lettered: usize,
    /// Records neither delivered nor dead-lettered, `(partition, offset)`.
    lost: Vec<(i32, i64)>,
    /// Deliveries and DLQ entries beyond the first per record.
    duplicates: usize,
    /// Records handled more than once, `((partition, offset), times)` (up to 20).
    duplicated: Vec<((i32, i64), usize)>,
    /// Values of the dead-lettered records, with their `x-dlq-error-class`.
    dlq: Vec<(String, String)>,
}

impl Tally {
    fn line(&self, t: &Target<'_>) -> String {
        format!(
            "chaos: {:<28} produced={:<6} delivered={:<6} dead-lettered={:<4} lost={:<4} duplicates={:<5} seed={}",
            t.scenario,
            self.produced,
            self.delivered,
            self.dead_lettered,
            self.lost.len(),
            self.duplicates,
            t.seed
        )
    }
}

/// Waits until the group committed every partition to its end, then checks every record of the
/// topic against what the app answered 2xx and what is in the DLQ. Fails on a committed offset
/// short of the end, a delivery or DLQ entry that does not match its source record, or DLQ
/// metadata that does not name it. Prints the summary line.
async fn check(t: &Target<'_>, app: &TestApp) -> Tally {
    let ends = end_offsets_on(&t.bootstrap, t.topic, t.partitions);
    let mut committed = vec![];
    let reached = wait_until(2 * MINUTE, || {
        committed = try_committed_on(&t.bootstrap, t.group, t.topic, t.partitions).unwrap_or_default();
        committed == ends
    })
    .await;
    assert!(
        reached,
        "{}: committed offsets {committed:?} never reached the end offsets {ends:?} (seed {})",
        t.scenario, t.seed
    );

    let source = read_all_on(&t.bootstrap, t.topic, t.partitions);
    let values: HashMap<(i32, i64), Vec<u8>> = source
        .iter()
        .map(|r| ((r.partition, r.offset), r.value.clone().unwrap_or_default()))
        .collect();
    let mut handled: HashMap<(i32, i64), usize> = HashMap::new();

    let mut delivered = HashSet::new();
    for r in app.delivered() {
        assert_eq!(r.topic, t.topic, "{}: a delivery from another topic", t.scenario);
        let value = values
            .get(&r.id())
            .unwrap_or_else(|| panic!("{}: delivered {:?}, which is not in the topic", t.scenario, r.id()));
        assert_eq!(
            &r.value,
            value,
            "{}: delivery of {:?} carries another value",
            t.scenario,
            r.id()
        );
        delivered.insert(r.id());
        *handled.entry(r.id()).or_default() += 1;
    }

    let mut dead = HashSet::new();
    let mut dlq = Vec::new();
    if let Some(dlq_topic) = t.dlq {
        for r in read_all_on(&t.bootstrap, dlq_topic, 1) {
            let h = |name: &str| r.headers.get(name).cloned().unwrap_or_default();
            assert_eq!(
                h("x-dlq-source-topic"),
                t.topic,
                "{}: DLQ source topic: {r:?}",
                t.scenario
            );
            assert_eq!(h("x-dlq-consumer-group"), t.group, "{}: DLQ group: {r:?}", t.scenario);
            let id = (
                h("x-dlq-source-partition").parse::<i32>().unwrap_or(-1),
                h("x-dlq-source-offset").parse::<i64>().unwrap_or(-1),
            );
            let value = values
                .get(&id)
                .unwrap_or_else(|| panic!("{}: DLQ record names no source record: {r:?}", t.scenario));
            assert_eq!(
                r.value.as_deref().unwrap_or_default(),
                &value[..],
                "{}: DLQ record of {id:?} carries another value",
                t.scenario
            );
            let class = h("x-dlq-error-class");
            assert!(
                !class.is_empty(),
                "{}: DLQ record without an error class: {r:?}",
                t.scenario
            );
            dlq.push((String::from_utf8_lossy(value).into_owned(), class));
            dead.insert(id);
            *handled.entry(id).or_default() += 1;
        }
    }

    let mut lost: Vec<_> = values.keys().filter(|id| !handled.contains_key(id)).copied().collect();
    lost.sort();
    let mut duplicated: Vec<_> = handled
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (*id, *n))
        .collect();
    duplicated.sort();
    let tally = Tally {
        produced: values.len(),
        delivered: delivered.len(),
        dead_lettered: dead.len(),
        duplicates: duplicated.iter().map(|(_, n)| n - 1).sum(),
        lost,
        duplicated: duplicated.into_iter().take(20).collect(),
        dlq,
    };
    summary(&tally.line(t));
    tally
}

/// Prints a summary line where it is seen even when the test passes: straight to the
/// process's stderr (libtest captures only the `print!` family), and appended to the file named
/// by `KAFKA_SIDECAR_CHAOS_REPORT` (scripts/test.sh prints it at the end).
fn summary(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
    if let Ok(path) = std::env::var("KAFKA_SIDECAR_CHAOS_REPORT") {
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn assert_nothing_lost(t: &Target<'_>, tally: &Tally) {
    assert!(
        tally.lost.is_empty(),
        "{}: {} records lost (seed {}), first: {:?}",
        t.scenario,
        tally.lost.len(),
        t.seed,
        &tally.lost[..tally.lost.len().min(20)]
    );
}

fn assert_no_duplicates(t: &Target<'_>, tally: &Tally) {
    assert_eq!(
        tally.duplicates, 0,
        "{}: records handled more than once (seed {}), ((partition, offset), times): {:?}",
        t.scenario, t.seed, tally.duplicated
    );
}

// ---- helpers of the scenarios -------------------------------------------------------------------

fn dlq_section(cfg: &mut SidecarConfig) -> String {
    let dlq = unique("chaos-dlq");
    cfg.dlq = Some(dlq.clone());
    dlq
}

/// Adds lines to the `[kafka]` section of a config.
fn with_kafka(toml: &str, lines: &str) -> String {
    toml.replace(
        "session_timeout = \"10s\"",
        &format!("session_timeout = \"10s\"\n{lines}"),
    )
}

/// Waits until the app received `n` more 2xx deliveries than `from`.
async fn progress(app: &TestApp, from: usize, n: usize, what: &str, logs: &[&Sidecar]) {
    let ok = wait_until(MINUTE, || app.delivered_count() >= from + n).await;
    assert!(
        ok,
        "no progress {what}: {} deliveries, expected {}\n{}",
        app.delivered_count(),
        from + n,
        logs.iter().map(|s| s.log()).collect::<Vec<_>>().join("\n----\n")
    );
}

async fn terminate(sidecar: &mut Sidecar, name: &str) {
    sidecar.signal(Signal::SIGTERM);
    let status = sidecar.wait_exit(GRACE + Duration::from_secs(5)).await;
    let status = status.unwrap_or_else(|| panic!("{name} did not exit after SIGTERM\n{}", sidecar.log()));
    assert!(
        status.success(),
        "{name} exits 0 after SIGTERM: {status:?}\n{}",
        sidecar.log()
    );
}

// ---- the scenarios ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigkill_five_times_at_random_moments_loses_nothing() {
    let _serial = SERIAL.lock().await;
    require_kafka();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let topic = unique("chaos-kill");
    create_topic(&topic, 3).await;
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(2),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let dlq = dlq_section(&mut cfg);
    create_topic(&dlq, 1).await;
    // Static membership: the restarted process takes its partitions back at once instead of
    // waiting out the killed member's session.
    let toml = with_kafka(&cfg.toml(), &format!("group_instance_id = \"{}\"", unique("member")));
    let stream = Stream::start(&brokers(), &topic, 600, 20_000, None);

    let mut sidecar = Sidecar::start_toml(&toml);
    let mut moments = Vec::new();
    for kill in 1..=5 {
        // A random moment once the restarted process delivers again (else it is killed in its
        // start-up, which proves less).
        let before = app.delivered_count();
        progress(
            &app,
            before,
            1,
            &format!("before kill {kill} (seed {seed})"),
            &[&sidecar],
        )
        .await;
        let wait = millis(&mut rng, 0..2_500);
        tokio::time::sleep(wait).await;
        moments.push(wait.as_millis());
        sidecar.kill9();
        sidecar = Sidecar::start_toml(&toml);
    }
    assert!(
        stream.sent() < 20_000,
        "the kills must happen while records are produced"
    );
    progress(&app, app.delivered_count(), 200, "after the last restart", &[&sidecar]).await;
    let produced = stream.finish().await;

    let t = Target {
        scenario: "sigkill x5",
        seed,
        bootstrap: brokers(),
        topic: &topic,
        partitions: 3,
        group: &cfg.group,
        dlq: Some(&dlq),
    };
    let tally = check(&t, &app).await;
    eprintln!("kill moments (ms after the restarted process delivered): {moments:?}");
    assert_eq!(tally.produced, produced);
    assert_nothing_lost(&t, &tally);
    assert_eq!(tally.dead_lettered, 0, "nothing is poison: {:?}", tally.dlq);
}

/// Scales 1 → 3 → 1 members while records flow; dedup off, so only an exact handover at the
/// committed watermark avoids duplicates. With `redis`, dedup is on and Redis restarts with
/// three members running.
async fn scale_one_three_one(scenario: &str, redis: Option<&mut TestRedis>) {
    require_kafka();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let topic = unique("chaos-scale");
    create_topic(&topic, 6).await;
    // A little latency, so every revoke finds records in flight.
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(5),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let dlq = dlq_section(&mut cfg);
    create_topic(&dlq, 1).await;
    if let Some(redis) = &redis {
        cfg.extra = format!(
            "[dedup]\nenabled = true\nredis_url = \"{}\"\nkey = \"offset\"\non_error = \"pause\"\ntimeout = \"500ms\"\n",
            redis.url()
        );
    }
    let toml = cfg.toml(); // the default revoke_drain_timeout (20s)
    let stream = Stream::start(&brokers(), &topic, 400, 20_000, None);

    let a = Sidecar::start_toml(&toml);
    progress(&app, 0, 500, "with one member", &[&a]).await;
    let mut b = Sidecar::start_toml(&toml);
    tokio::time::sleep(millis(&mut rng, 0..1_500)).await;
    let mut c = Sidecar::start_toml(&toml);
    assert!(
        wait_until(MINUTE, || group_members(&cfg.group) == 3).await,
        "three members"
    );
    progress(&app, app.delivered_count(), 800, "with three members", &[&a, &b, &c]).await;
    if let Some(redis) = redis {
        redis.shutdown_nosave();
        tokio::time::sleep(millis(&mut rng, 1_000..3_000)).await;
        redis.restart();
        progress(
            &app,
            app.delivered_count(),
            800,
            "after the Redis restart",
            &[&a, &b, &c],
        )
        .await;
    }
    tokio::time::sleep(millis(&mut rng, 0..1_500)).await;
    terminate(&mut c, "the third member").await;
    progress(
        &app,
        app.delivered_count(),
        500,
        "after the third member left",
        &[&a, &b],
    )
    .await;
    tokio::time::sleep(millis(&mut rng, 0..1_500)).await;
    terminate(&mut b, "the second member").await;
    progress(&app, app.delivered_count(), 500, "after the second member left", &[&a]).await;
    assert!(stream.sent() < 20_000, "records must be produced throughout");
    let produced = stream.finish().await;

    let t = Target {
        scenario,
        seed,
        bootstrap: brokers(),
        topic: &topic,
        partitions: 6,
        group: &cfg.group,
        dlq: Some(&dlq),
    };
    let tally = check(&t, &app).await;
    let logs = format!("{}\n----\n{}\n----\n{}", a.log(), b.log(), c.log());
    if !tally.lost.is_empty() || tally.duplicates > 0 {
        eprintln!("---- member logs ----\n{logs}");
    }
    assert_eq!(tally.produced, produced);
    assert_nothing_lost(&t, &tally);
    assert_no_duplicates(&t, &tally);
    assert_eq!(tally.dead_lettered, 0, "nothing is poison: {:?}", tally.dlq);
    assert!(
        logs.contains("partitions revoked"),
        "the members must have handed partitions over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_scale_one_three_one_hands_over_exactly_at_the_committed_watermark() {
    let _serial = SERIAL.lock().await;
    scale_one_three_one("scale 1-3-1", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_scale_one_three_one_with_dedup_and_a_redis_restart() {
    let _serial = SERIAL.lock().await;
    let mut redis = TestRedis::start(&[]);
    scale_one_three_one("scale 1-3-1 dedup+redis", Some(&mut redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_flapping_app_dead_letters_only_real_poison() {
    let _serial = SERIAL.lock().await;
    require_kafka();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let topic = unique("chaos-flap");
    create_topic(&topic, 3).await;
    // 1 % of first attempts answer 500 (chosen by offset, so the same ones after a restart);
    // poison is answered 422 whatever the attempt; during a 503 outage everything gets 503.
    let unavailable = Arc::new(AtomicBool::new(false));
    let down = unavailable.clone();
    let mut app = TestApp::start(move |r| {
        if down.load(Ordering::Relaxed) {
            Answer::status(503)
        } else if r.value.starts_with(b"poison") {
            Answer::status(422)
        } else if r.attempt <= 1 && (r.offset * 7 + r.partition as i64) % 100 == 3 {
            Answer::status(500)
        } else {
            Answer::ok()
        }
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let dlq = dlq_section(&mut cfg);
    create_topic(&dlq, 1).await;
    let stream = Stream::start(&brokers(), &topic, 500, 20_000, Some(997));
    let sidecar = Sidecar::start(&cfg);

    // Two 5 s outages: one with connections refused (the app is down), one answering 503.
    let mut outages = Vec::new();
    for refused in [true, false] {
        progress(&app, app.delivered_count(), 300, "while the app is up", &[&sidecar]).await;
        tokio::time::sleep(millis(&mut rng, 0..2_000)).await;
        outages.push(stream.sent());
        if refused {
            app.stop();
            tokio::time::sleep(Duration::from_secs(5)).await;
            app = app.restart().await;
        } else {
            unavailable.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(5)).await;
            unavailable.store(false, Ordering::Relaxed);
        }
    }
    progress(&app, app.delivered_count(), 300, "after the last outage", &[&sidecar]).await;
    assert!(stream.sent() < 20_000, "records must be produced throughout");
    let produced = stream.finish().await;

    let t = Target {
        scenario: "flapping app",
        seed,
        bootstrap: brokers(),
        topic: &topic,
        partitions: 3,
        group: &cfg.group,
        dlq: Some(&dlq),
    };
    let tally = check(&t, &app).await;
    eprintln!("outages began after record {outages:?} was produced");
    assert_eq!(tally.produced, produced);
    assert_nothing_lost(&t, &tally);
    let poison = (0..produced).filter(|i| i % 997 == 996).count();
    assert!(poison >= 3, "the stream must contain real poison");
    let not_poison: Vec<_> = tally.dlq.iter().filter(|(v, _)| !v.starts_with("poison")).collect();
    assert!(
        not_poison.is_empty(),
        "only poison is dead-lettered, also: {not_poison:?}\n{}",
        sidecar.log()
    );
    assert_eq!(tally.dead_lettered, poison, "every poison record is dead-lettered");
    assert!(
        tally.dlq.iter().all(|(_, class)| class == "http_422"),
        "poison is dead-lettered as http_422: {:?}",
        tally.dlq
    );
    let first_500s = app.requests().iter().filter(|r| r.status == 500).count();
    assert!(first_500s > 0, "some first attempts were answered 500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigterm_at_peak_throughput_exits_zero_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    require_kafka();
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let topic = unique("chaos-term");
    create_topic(&topic, 3).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.workers = 16;
    let dlq = dlq_section(&mut cfg);
    create_topic(&dlq, 1).await;
    // A backlog, so the sidecar runs flat out, and records keep coming while it does. Large
    // enough that the SIGTERM (at most ~0.3 s after the first 1,000) lands inside it at the
    // single-mode rate of a quiet machine (~40k records/s with 64 workers; 16 here).
    const BACKLOG: usize = 60_000;
    produce(
        &topic,
        (0..BACKLOG)
            .map(|i| Out::keyed(format!("k{}", i % 40), format!("backlog{i}")))
            .collect(),
    )
    .await;
    let stream = Stream::start(&brokers(), &topic, 300, 20_000, None);
    let mut sidecar = Sidecar::start(&cfg);
    progress(&app, 0, 1_000, "before SIGTERM", &[&sidecar]).await;
    tokio::time::sleep(millis(&mut rng, 0..300)).await;
    let at = app.delivered_count();
    sidecar.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    let last_second = app
        .delivered()
        .iter()
        .filter(|r| signalled.duration_since(r.at) <= Duration::from_secs(1))
        .count();
    let status = sidecar.wait_exit(GRACE).await;
    let status = status.unwrap_or_else(|| panic!("no exit within the grace period {GRACE:?}\n{}", sidecar.log()));
    assert!(status.success(), "exit 0 after SIGTERM: {status:?}\n{}", sidecar.log());
    let took = signalled.elapsed();
    assert!(at < BACKLOG, "SIGTERM must come while the backlog is worked through");

    let restarted = Sidecar::start(&cfg);
    progress(&app, app.delivered_count(), 500, "after the restart", &[&restarted]).await;
    let produced = stream.finish().await + BACKLOG;

    let t = Target {
        scenario: "sigterm at peak",
        seed,
        bootstrap: brokers(),
        topic: &topic,
        partitions: 3,
        group: &cfg.group,
        dlq: Some(&dlq),
    };
    let tally = check(&t, &app).await;
    eprintln!("SIGTERM after {at} deliveries ({last_second} in the second before it); exited after {took:?}");
    assert_eq!(tally.produced, produced);
    assert_nothing_lost(&t, &tally);
    assert_no_duplicates(&t, &tally);
    assert_eq!(tally.dead_lettered, 0, "nothing is poison: {:?}", tally.dlq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_15s_broker_outage_loses_nothing_and_the_sidecar_recovers_without_a_restart() {
    let _serial = SERIAL.lock().await;
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    // A broker of this test's own, to stop and start.
    let mut kafka = tokio::task::block_in_place(TestKafka::start);
    let bootstrap = kafka.bootstrap();
    let topic = unique("chaos-outage");
    create_topic_on(&bootstrap, &topic, 3).await;
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(2),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let dlq = dlq_section(&mut cfg);
    create_topic_on(&bootstrap, &dlq, 1).await;
    let toml = cfg.toml().replace(
        &format!("brokers = \"{}\"", brokers()),
        &format!("brokers = \"{bootstrap}\""),
    );
    assert!(toml.contains(&bootstrap), "the sidecar uses the test broker");
    let stream = Stream::start(&bootstrap, &topic, 300, 20_000, None);
    let mut sidecar = Sidecar::start_toml(&toml);
    progress(&app, 0, 500, "before the outage", &[&sidecar]).await;
    tokio::time::sleep(millis(&mut rng, 0..2_000)).await;

    kafka.stop();
    let stopped_at = app.delivered_count();
    tokio::time::sleep(Duration::from_secs(15)).await;
    // Records read before the outage may finish during it; nothing new can be read.
    let during = app.delivered_count() - stopped_at;
    let restarting = Instant::now();
    tokio::task::block_in_place(|| kafka.restart());
    let restart_took = restarting.elapsed();
    let restarted_at = app.delivered_count();
    progress(&app, restarted_at, 1_000, "after the broker came back", &[&sidecar]).await;
    let recovered_after = restarting.elapsed();
    assert!(
        sidecar.wait_exit(Duration::from_millis(10)).await.is_none(),
        "the sidecar keeps running through the outage\n{}",
        sidecar.log()
    );
    assert!(stream.sent() < 20_000, "records must be produced throughout");
    let produced = stream.finish().await;

    let t = Target {
        scenario: "broker outage 15s",
        seed,
        bootstrap: bootstrap.clone(),
        topic: &topic,
        partitions: 3,
        group: &cfg.group,
        dlq: Some(&dlq),
    };
    let tally = check(&t, &app).await;
    eprintln!(
        "{during} deliveries during the outage; the broker restarted in {restart_took:?}; \
         1,000 more deliveries {recovered_after:?} after the restart began"
    );
    assert_eq!(tally.produced, produced);
    assert_nothing_lost(&t, &tally);
    assert_eq!(tally.dead_lettered, 0, "nothing is poison: {:?}", tally.dlq);
    assert!(
        sidecar.wait_exit(Duration::from_millis(10)).await.is_none(),
        "the sidecar is still the same process\n{}",
        sidecar.log()
    );
}
