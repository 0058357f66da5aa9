//! What users see when Kafka is misconfigured or missing: a clear log line and a retry, or a
//! clear exit — never a panic or a silent hang.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_topic_is_reported_and_consumed_once_it_exists() {
    require_kafka();
    let topic = unique("later");
    let app = TestApp::start(|_| Answer::ok()).await;
    let cfg = SidecarConfig::new(&topic, &app);
    let sidecar = Sidecar::start(&cfg);
    let reported = wait_until(Duration::from_secs(30), || sidecar.log().contains("does not exist")).await;
    assert!(
        reported,
        "the log must say the topic does not exist:\n{}",
        sidecar.log()
    );

    create_topic(&topic, 1).await;
    produce(&topic, vec![Out::keyed("k", "hello")]).await;
    assert!(
        wait_until(Duration::from_secs(60), || app.delivered_count() == 1).await,
        "consumed once the topic exists"
    );
    assert!(!sidecar.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_brokers_are_retried_with_a_clear_log_and_sigterm_still_exits_cleanly() {
    let app = TestApp::start(|_| Answer::ok()).await;
    let cfg = SidecarConfig::new("nowhere", &app);
    let toml = cfg
        .toml()
        .replace(&format!("brokers = \"{}\"", brokers()), "brokers = \"127.0.0.1:1\"");
    let mut sidecar = Sidecar::start_toml(&toml);
    let reported = wait_until(Duration::from_secs(30), || {
        sidecar.log().contains("cannot reach the Kafka brokers")
    })
    .await;
    assert!(
        reported,
        "the log must say the brokers are unreachable:\n{}",
        sidecar.log()
    );
    assert!(
        sidecar.wait_exit(Duration::from_millis(100)).await.is_none(),
        "it keeps retrying"
    );

    sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sidecar
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", sidecar.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_security_settings_exit_non_zero_naming_the_problem() {
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new("t", &app);
    cfg.extra =
        "[kafka.properties]\n\"security.protocol\" = \"SSL\"\n\"ssl.ca.location\" = \"/nonexistent/ca.pem\"\n".into();
    let mut sidecar = Sidecar::start(&cfg);
    let status = sidecar.wait_exit(Duration::from_secs(20)).await.expect("exits");
    assert!(!status.success());
    let log = sidecar.log();
    assert!(
        log.contains("ssl.ca.location") || log.contains("/nonexistent/ca.pem"),
        "the message names the setting:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}
