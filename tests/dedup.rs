//! Dedup end to end: the real binary, the real broker, a real Redis and a real HTTP app.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::redis_server::TestRedis;
use common::*;
use nix::sys::signal::Signal;

const MINUTE: Duration = Duration::from_secs(60);
/// The Redis that `scripts/env.sh up` starts.
const SHARED_REDIS: &str = "redis://127.0.0.1:6379/0";

fn dedup_section(redis_url: &str, key: &str) -> String {
    format!("[dedup]\nenabled = true\nredis_url = \"{redis_url}\"\nkey = \"{key}\"\nlease_ttl = \"10s\"\n")
}

fn require_redis(url: &str) {
    let client = redis::Client::open(url).unwrap();
    if let Err(e) = client.get_connection_with_timeout(Duration::from_secs(2)) {
        panic!("Redis is not reachable at {url} ({e}). Start it with: bash scripts/env.sh up");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_sharing_an_idempotency_key_header_reach_the_app_once_per_key() {
    require_kafka();
    require_redis(SHARED_REDIS);
    let topic = unique("dedup-header");
    create_topic(&topic, 3).await;
    // 1,000 records, 200 idempotency keys; record keys spread copies of one idempotency key
    // over all partitions and lanes, so copies are in flight at the same time.
    produce(
        &topic,
        (0..1000)
            .map(|i| {
                let mut out = Out::keyed(format!("k{}", i % 7), format!("v{i}"));
                out.headers.push(("idempotency-key".into(), format!("id-{}", i % 200)));
                out
            })
            .collect(),
    )
    .await;
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(2),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let port = free_port();
    cfg.admin_port = Some(port);
    cfg.extra = dedup_section(SHARED_REDIS, "header:idempotency-key");
    let sidecar = Sidecar::start(&cfg);

    assert_committed_to_end(&cfg.group, &topic, 3).await;
    let metrics = http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1;
    let outcome = |o: &str| {
        metric(
            &metrics,
            "kafka_sidecar_records_total",
            &[("topic", &topic), ("outcome", o)],
        )
        .unwrap_or(0.0)
    };
    let delivered = app.delivered();
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for r in &delivered {
        let key = r
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .expect("every request carries Idempotency-Key")
            .to_string();
        *per_key.entry(key).or_default() += 1;
    }
    let repeated: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "keys delivered more than once: {repeated:?}");
    assert_eq!(per_key.len(), 200, "each of the 200 keys is delivered once");
    assert_eq!(delivered.len(), 200);
    assert_eq!(outcome("delivered"), 200.0, "{}", sidecar.log());
    assert_eq!(outcome("deduplicated"), 800.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_and_one_leaving_mid_stream_lose_nothing_and_offset_dedup_stops_duplicates() {
    require_kafka();
    require_redis(SHARED_REDIS);
    let topic = unique("dedup-rebalance");
    create_topic(&topic, 6).await;
    produce(
        &topic,
        (0..3000)
            .map(|i| Out::keyed(format!("k{}", i % 60), format!("v{i}")))
            .collect(),
    )
    .await;
    // A slow app: rebalances happen while deliveries are in flight.
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(30),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.workers = 4;
    // Revoked partitions are committed without waiting for their in-flight deliveries, so the
    // new owner reads records the old one is still delivering: only dedup keeps them apart.
    // Small fetches and a small in-flight bound spread the records in flight over every
    // partition, so each revoke catches some.
    cfg.extra = format!(
        "{}\n[kafka.properties]\n\"max.partition.fetch.bytes\" = 2048\n",
        dedup_section(SHARED_REDIS, "offset")
    );
    let toml = cfg.toml().replace(
        "session_timeout = \"10s\"",
        "session_timeout = \"10s\"\nrevoke_drain_timeout = \"0s\"",
    );
    let env = [("KAFKA_SIDECAR_PIPELINE__MAX_IN_FLIGHT_RECORDS", "120")];
    let a = Sidecar::start_with_env(&toml, &env);
    let mut b = Sidecar::start_with_env(&toml, &env);
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 600).await,
        "only {} delivered before the third member joins",
        app.delivered_count()
    );
    let c = Sidecar::start_with_env(&toml, &env);
    let before = app.delivered_count();
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= before + 600).await,
        "only {} delivered after the third member joined",
        app.delivered_count()
    );
    assert_eq!(group_members(&cfg.group), 3, "three members after the join");
    b.signal(Signal::SIGTERM);
    let status = b.wait_exit(Duration::from_secs(30)).await.expect("b exits");
    assert!(status.success(), "b exits 0: {status:?}\n{}", b.log());
    assert!(
        wait_until(2 * MINUTE, || app
            .delivered()
            .iter()
            .map(Request::id)
            .collect::<HashSet<_>>()
            .len()
            >= 3000)
        .await,
        "only {} distinct records delivered",
        app.delivered().iter().map(Request::id).collect::<HashSet<_>>().len()
    );
    assert_committed_to_end(&cfg.group, &topic, 6).await;
    let revoked_logs = [&a, &c].iter().map(|s| s.log()).collect::<String>() + &b.log();
    assert!(
        revoked_logs.contains("revoke drain timed out"),
        "the test must revoke partitions with records in flight, which their new owner reads again"
    );
    assert_each_offset_once(&app.delivered(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_stream_with_on_error_pause_loses_nothing_and_duplicates_nothing() {
    require_kafka();
    let mut redis = TestRedis::start(&[]);
    let topic = unique("dedup-redis-restart");
    create_topic(&topic, 3).await;
    produce(
        &topic,
        (0..2000)
            .map(|i| Out::keyed(format!("k{}", i % 40), format!("v{i}")))
            .collect(),
    )
    .await;
    let app = TestApp::start(|_| Answer {
        delay: Duration::from_millis(10),
        ..Answer::ok()
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let port = free_port();
    cfg.admin_port = Some(port);
    cfg.extra = format!(
        "{}on_error = \"pause\"\ntimeout = \"500ms\"\n",
        dedup_section(&redis.url(), "offset")
    );
    let sidecar = Sidecar::start(&cfg);
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 400).await,
        "only {} delivered before the Redis restart\n{}",
        app.delivered_count(),
        sidecar.log()
    );

    redis.shutdown_nosave();
    // Deliveries already past their claim may complete; then nothing new reaches the app.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let while_down = app.requests().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        app.requests().len(),
        while_down,
        "no delivery while Redis is down (on_error = pause)"
    );
    let metrics = http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1;
    let errors = metric(&metrics, "kafka_sidecar_dedup_errors_total", &[("op", "claim")]).unwrap_or(0.0)
        + metric(&metrics, "kafka_sidecar_dedup_errors_total", &[("op", "done")]).unwrap_or(0.0);
    assert!(errors > 0.0, "the sidecar saw Redis fail:\n{metrics}");
    assert!(while_down < 2000, "the stream was still running when Redis went down");

    redis.restart();
    assert!(
        wait_until(2 * MINUTE, || app.delivered_count() >= 2000).await,
        "only {} delivered after Redis came back\n{}",
        app.delivered_count(),
        sidecar.log()
    );
    assert_committed_to_end(&cfg.group, &topic, 3).await;
    assert_each_offset_once(&app.delivered(), 2000);
    assert!(
        sidecar.log().contains("dedup store unavailable"),
        "the outage is logged"
    );
}

/// Deletes a topic and waits until the brokers no longer list it.
async fn delete_topic(name: &str) {
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.delete_topics(&[name], &opts).await.expect("delete_topics") {
        r.unwrap_or_else(|(t, e)| panic!("failed to delete topic {t}: {e}"));
    }
    let gone = wait_until(MINUTE, || {
        admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .map(|m| m.topics().iter().all(|t| t.partitions().is_empty()))
            .unwrap_or(false)
    })
    .await;
    assert!(gone, "topic {name} still listed a minute after its deletion");
}

/// Creates a topic again after its deletion (the broker refuses while the deletion is still
/// being carried out).
async fn recreate_topic(name: &str) {
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client");
    let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let topic = rdkafka::admin::NewTopic::new(name, 1, rdkafka::admin::TopicReplication::Fixed(1));
        let result = admin.create_topics(&[topic], &opts).await.expect("create_topics");
        match result.into_iter().next().expect("one result") {
            Ok(_) => return,
            Err((t, e)) if std::time::Instant::now() > deadline => panic!("failed to re-create topic {t}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_and_recreated_topic_is_delivered_again_with_offset_dedup() {
    require_kafka();
    require_redis(SHARED_REDIS);
    let topic = unique("dedup-recreated");
    create_topic(&topic, 1).await;
    let values = |tag: &str| -> Vec<Out> {
        (0..5)
            .map(|i| Out::keyed(format!("k{i}"), format!("{tag}-{i}")))
            .collect()
    };
    produce(&topic, values("old")).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let port = free_port();
    cfg.admin_port = Some(port);
    cfg.extra = dedup_section(SHARED_REDIS, "offset");
    let mut first = Sidecar::start(&cfg);
    assert_committed_to_end(&cfg.group, &topic, 1).await;
    first.signal(Signal::SIGTERM);
    let status = first.wait_exit(MINUTE).await.expect("the first sidecar exits");
    assert!(status.success(), "{status:?}\n{}", first.log());
    assert_eq!(app.delivered_count(), 5, "the first incarnation is delivered");

    // Same topic name, same group, same offsets 0..4: only the records are new.
    delete_topic(&topic).await;
    recreate_topic(&topic).await;
    produce(&topic, values("new")).await;
    let second = Sidecar::start(&cfg);
    let delivered_new = || {
        app.delivered()
            .iter()
            .filter(|r| r.value_str().starts_with("new-"))
            .map(Request::id)
            .collect::<HashSet<_>>()
            .len()
    };
    assert!(
        wait_until(MINUTE, || delivered_new() == 5).await,
        "records of the re-created topic were not delivered ({} of 5); delivered: {:?}\n{}",
        delivered_new(),
        app.delivered()
            .iter()
            .map(|r| (r.offset, r.value_str()))
            .collect::<Vec<_>>(),
        second.log()
    );
    assert_committed_to_end(&cfg.group, &topic, 1).await;
    let metrics = http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1;
    let deduplicated = metric(
        &metrics,
        "kafka_sidecar_records_total",
        &[("topic", &topic), ("outcome", "deduplicated")],
    );
    assert_eq!(
        deduplicated.unwrap_or(0.0),
        0.0,
        "nothing of the new incarnation is a duplicate"
    );
}
