//! Rate limiting, adaptive back-off, the circuit breaker and the readiness gate, on the real
//! broker with the real binary.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MINUTE: Duration = Duration::from_secs(60);

async fn status_json(port: u16) -> serde_json::Value {
    let (_, body) = http_get(&format!("http://127.0.0.1:{port}/status")).await;
    serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_of_200_records_per_second_holds_within_ten_percent_over_ten_seconds() {
    require_kafka();
    let topic = unique("rate");
    create_topic(&topic, 3).await;
    produce(
        &topic,
        (0..4000)
            .map(|i| Out::keyed(format!("k{}", i % 100), format!("v{i}")))
            .collect(),
    )
    .await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.extra = "[rate_limit]\nrecords_per_second = 200.0\n".into();
    let _sidecar = Sidecar::start(&cfg);

    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 1).await,
        "delivery did not start"
    );
    tokio::time::sleep(Duration::from_secs(13)).await;
    // Measured on the app's clock, after a 2 s warm-up that absorbs the initial burst.
    let requests = app.requests();
    let start = requests.iter().map(|r| r.at).min().unwrap() + Duration::from_secs(2);
    let end = start + Duration::from_secs(10);
    let in_window = requests.iter().filter(|r| r.at >= start && r.at < end).count();
    let rate = in_window as f64 / 10.0;
    assert!(
        (180.0..=220.0).contains(&rate),
        "measured {rate} records/s, want 200 ± 10 %"
    );
}

/// Runs a sidecar against an app that answers 429 with `Retry-After: 1` for its first 5 s;
/// returns how many requests the app received during those 5 s and the app.
async fn push_back_run(adaptive: bool) -> (usize, TestApp, u16, Sidecar) {
    let topic = unique("pushback");
    create_topic(&topic, 3).await;
    produce(
        &topic,
        (0..2000)
            .map(|i| Out::keyed(format!("k{}", i % 200), format!("v{i}")))
            .collect(),
    )
    .await;
    let first: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let f = first.clone();
    let app = TestApp::start(move |_| {
        let t0 = *f.lock().unwrap().get_or_insert_with(Instant::now);
        if t0.elapsed() < Duration::from_secs(5) {
            Answer {
                retry_after: Some(1),
                ..Answer::status(429)
            }
        } else {
            Answer {
                delay: Duration::from_millis(5),
                ..Answer::ok()
            }
        }
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.workers = 8;
    let port = free_port();
    cfg.admin_port = Some(port);
    cfg.extra = format!("[rate_limit]\nadaptive = {adaptive}\n");
    let sidecar = Sidecar::start(&cfg);
    assert!(
        wait_until(MINUTE, || !app.requests().is_empty()).await,
        "delivery did not start"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t0 = first.lock().unwrap().unwrap();
    let during = app
        .requests()
        .iter()
        .filter(|r| r.at < t0 + Duration::from_secs(5))
        .count();
    (during, app, port, sidecar)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_makes_the_sidecar_back_off_then_recover_full_speed() {
    require_kafka();
    let (without, _, _, sidecar) = push_back_run(false).await;
    drop(sidecar);
    let (with, app, port, _sidecar) = push_back_run(true).await;
    assert!(
        with * 2 < without,
        "adaptation must cut the requests during the 429 period: {with} with, {without} without"
    );
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 2000).await,
        "only {} delivered",
        app.delivered_count()
    );
    let text = http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1;
    assert_eq!(
        metric(&text, "kafka_sidecar_concurrency_limit", &[]),
        Some(8.0),
        "concurrency back to all 8 workers"
    );
    assert!(
        app.max_in_flight() >= 6,
        "full speed uses the workers again: max {} in flight",
        app.max_in_flight()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_outage_opens_the_breaker_pauses_consumption_and_dead_letters_nothing() {
    require_kafka();
    let topic = unique("breaker");
    let dlq = unique("breaker-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    produce(
        &topic,
        (0..500)
            .map(|i| Out::keyed(format!("k{}", i % 50), format!("v{i}")))
            .collect(),
    )
    .await;
    let down = Arc::new(AtomicBool::new(true));
    let d = down.clone();
    let app = TestApp::start(move |_| {
        if d.load(Ordering::SeqCst) {
            Answer::status(503)
        } else {
            Answer::ok()
        }
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    let port = free_port();
    cfg.admin_port = Some(port);
    cfg.extra = "[breaker]\ncool_down = \"2s\"\nmax_cool_down = \"4s\"\n".into();
    let _sidecar = Sidecar::start(&cfg);
    let outage_started = Instant::now();

    let opened = wait_until(Duration::from_secs(15), || {
        futures::executor::block_on(status_json(port))["breaker"] != "closed"
    })
    .await;
    assert!(opened, "the breaker must open");
    // The poll thread notices the open breaker on its next loop turn (≤ 100 ms); allow slack.
    let paused = wait_until(Duration::from_secs(5), || {
        futures::executor::block_on(status_json(port))["paused"] == true
    })
    .await;
    assert!(paused, "consumption pauses while the breaker is open");
    let lag = |text: &str| metric(text, "kafka_sidecar_consumer_lag_records", &[("topic", &topic)]).unwrap_or(0.0);
    let before = http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1;
    produce(
        &topic,
        (500..1000)
            .map(|i| Out::keyed(format!("k{}", i % 50), format!("v{i}")))
            .collect(),
    )
    .await;
    let grew = wait_until(Duration::from_secs(10), || {
        lag(&futures::executor::block_on(http_get(&format!("http://127.0.0.1:{port}/metrics"))).1)
            >= lag(&before) + 500.0
    })
    .await;
    assert!(grew, "lag grows while the breaker is open");
    let consumed = |text: &str| {
        metric(
            text,
            "kafka_sidecar_records_total",
            &[("topic", &topic), ("outcome", "consumed")],
        )
        .unwrap_or(0.0)
    };
    let after = http_get(&format!("http://127.0.0.1:{port}/metrics")).await.1;
    assert!(
        consumed(&after) < 1000.0,
        "paused partitions are not read: consumed {}",
        consumed(&after)
    );

    tokio::time::sleep((outage_started + Duration::from_secs(20)).saturating_duration_since(Instant::now())).await;
    down.store(false, Ordering::SeqCst);
    let all = || {
        app.delivered()
            .iter()
            .map(|r| r.id())
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert!(
        wait_until(2 * MINUTE, || all() >= 1000).await,
        "only {} delivered after recovery",
        all()
    );
    assert_eq!(
        end_offsets(&dlq, 1),
        vec![0],
        "nothing is dead-lettered during an outage"
    );
    assert!(
        wait_until(Duration::from_secs(15), || futures::executor::block_on(status_json(
            port
        ))["breaker"]
            == "closed")
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_joins_the_group_only_once_the_app_is_healthy() {
    require_kafka();
    let topic = unique("gate");
    create_topic(&topic, 1).await;
    produce(&topic, vec![Out::keyed("k", "v")]).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    app.stop();
    let cfg = SidecarConfig::new(&topic, &app);
    let toml = cfg.toml().replace(
        "[app]\n",
        &format!("[app]\nhealth_url = \"http://127.0.0.1:{}/health\"\n", app.port),
    );
    let sidecar = Sidecar::start_toml(&toml);

    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        group_members(&cfg.group),
        0,
        "no member before the app is healthy\n{}",
        sidecar.log()
    );
    assert!(sidecar.log().contains("waiting for the app to be healthy"));
    let app = app.restart().await;
    assert!(
        wait_until(MINUTE, || group_members(&cfg.group) == 1).await,
        "joins once the app is healthy"
    );
    assert!(wait_until(MINUTE, || app.delivered_count() == 1).await);
}
