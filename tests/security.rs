//! The Kafka connection over TLS + SASL/SCRAM-SHA-512: the broker's SASL_SSL listener that
//! `scripts/env.sh` makes (test CA, SCRAM user from Kafka's own tools), the real binary.

mod common;

use std::time::{Duration, Instant};

use common::*;

const MINUTE: Duration = Duration::from_secs(60);
const AUTH_FAILED: &str = "kafka authentication failed";

/// A sidecar config whose only broker address is the SASL_SSL listener.
fn sasl_toml(cfg: &SidecarConfig, password: &str) -> String {
    let plain = format!("brokers = \"{}\"", brokers());
    let toml = cfg.toml();
    assert!(
        toml.contains(&plain),
        "SidecarConfig::toml names the brokers as expected"
    );
    toml.replace(&plain, &format!("brokers = \"{}\"", sasl_brokers())) + &sasl_properties(password)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_consumed_dead_lettered_and_committed_over_tls_and_scram() {
    require_kafka();
    require_sasl_kafka();
    let topic = unique("sasl");
    let dlq = unique("sasl-dlq");
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let records: Vec<Out> = (0..90)
        .map(|i| {
            Out::keyed(
                format!("k{}", i % 9),
                if i % 30 == 7 {
                    format!("poison-{i}")
                } else {
                    format!("ok-{i}")
                },
            )
        })
        .collect();
    produce(&topic, records).await;
    let app = TestApp::start(|r| {
        if r.value_str().starts_with("poison") {
            Answer::status(422)
        } else {
            Answer::ok()
        }
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    let port = free_port();
    cfg.admin_port = Some(port);
    let sidecar = Sidecar::start_toml(&sasl_toml(&cfg, SCRAM_PASSWORD));

    // The consumer (commits included) goes through the SASL_SSL listener only.
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 3, 2 * MINUTE).await;
    assert_eq!(committed, ends, "committed offsets reach the end over SASL_SSL");
    let delivered = app.delivered();
    assert_each_offset_once(&delivered, 87);
    assert!(delivered.iter().all(|r| r.value_str().starts_with("ok-")));

    // The DLQ producer shares the security settings.
    let dead = read_all(&dlq, 1);
    let mut values: Vec<String> = dead
        .iter()
        .map(|d| String::from_utf8_lossy(d.value.as_deref().unwrap_or_default()).into_owned())
        .collect();
    values.sort();
    assert_eq!(
        values,
        ["poison-37", "poison-67", "poison-7"],
        "the poison records are dead-lettered"
    );
    for d in &dead {
        assert_eq!(d.headers["x-dlq-source-topic"], topic);
        assert_eq!(d.headers["x-dlq-error-class"], "http_422");
    }

    // So does the lag monitor: it learnt every partition's end offset over its own connection.
    let url = format!("http://127.0.0.1:{port}/status");
    let mut last = String::new();
    let lag_known = wait_until(MINUTE, || {
        let (code, body) = futures::executor::block_on(http_get(&url));
        last = body;
        let Ok(status) = serde_json::from_str::<serde_json::Value>(&last) else {
            return false;
        };
        code == 200
            && status["partitions"].as_array().is_some_and(|parts| {
                parts.len() == 3
                    && parts.iter().all(|p| {
                        let i = p["partition"].as_u64().unwrap_or(99) as usize;
                        p["high_watermark"].as_i64() == ends.get(i).copied() && p["lag"] == 0
                    })
            })
    })
    .await;
    assert!(
        lag_known,
        "the lag monitor reports each partition's end offset and lag 0: {last}"
    );

    let log = sidecar.log();
    assert!(!log.contains(AUTH_FAILED), "no authentication failure: {log}");
    assert!(!log.contains(SCRAM_PASSWORD), "the password is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_named_in_the_log_and_retried_with_backoff_without_exiting() {
    require_kafka();
    require_sasl_kafka();
    let topic = unique("sasl-wrong");
    create_topic(&topic, 1).await;
    produce(&topic, vec![Out::keyed("k", "v")]).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let port = free_port();
    cfg.admin_port = Some(port);
    let password = format!("wrong-{}", unique("pw"));
    let mut sidecar = Sidecar::start_toml(&sasl_toml(&cfg, &password));
    let started = Instant::now();

    // Retrying: the failure is named at each attempt (each waits up to 10 s for the brokers'
    // answer, then backs off), also once librdkafka suppresses its repeated error events.
    let count = |log: &str| log.lines().filter(|l| l.contains(AUTH_FAILED)).count();
    let retried = wait_until(2 * MINUTE, || count(&sidecar.log()) >= 3).await;
    assert!(
        retried,
        "the authentication failure is logged at each retry: {}",
        sidecar.log()
    );
    let window = started.elapsed();
    assert!(
        sidecar.wait_exit(Duration::from_millis(100)).await.is_none(),
        "the sidecar keeps running and retrying: {}",
        sidecar.log()
    );
    let (code, _) = http_get(&format!("http://127.0.0.1:{port}/readyz")).await;
    assert_eq!(code, 503, "not ready while the brokers refuse the login");

    let log = sidecar.log();
    let line = log.lines().find(|l| l.contains(AUTH_FAILED)).unwrap_or_default();
    assert!(
        line.contains("sasl.password") && line.contains("invalid credentials") && line.contains("SCRAM-SHA-512"),
        "the log line names the cause (the broker's reason) and the settings to check: {line}"
    );
    // Attempts are seconds apart (a 10 s metadata wait, then a backoff of 0.5 s doubling to
    // 30 s), not a tight loop: generously, at most one per 2 s.
    let attempts = count(&log);
    assert!(
        attempts as u64 <= 1 + window.as_secs() / 2,
        "{attempts} attempts in {window:?}: the retries back off\n{log}"
    );
    assert!(
        !log.contains("cannot reach the Kafka brokers"),
        "reachable brokers are not called unreachable:\n{log}"
    );
    assert!(!log.contains(&password), "the password is never logged:\n{log}");
    assert_eq!(app.requests().len(), 0, "nothing is delivered without a login");

    // Still stoppable at once while retrying.
    sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sidecar.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM stops the retrying sidecar cleanly: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_an_unknown_ca_is_named_in_the_log() {
    require_kafka();
    require_sasl_kafka();
    // A CA of our own, which did not sign the broker's certificate.
    let dir = tempfile::tempdir().unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not the broker's CA",
        ])
        .arg("-keyout")
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .expect("openssl (scripts/env.sh installs it)");
    assert!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let topic = unique("sasl-ca");
    create_topic(&topic, 1).await;
    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    let port = free_port();
    cfg.admin_port = Some(port);
    let toml =
        sasl_toml(&cfg, SCRAM_PASSWORD).replace(&test_ca().display().to_string(), &other_ca.display().to_string());
    assert!(toml.contains("other-ca.pem"));
    let mut sidecar = Sidecar::start_toml(&toml);

    let named = wait_until(MINUTE, || sidecar.log().contains("kafka TLS handshake failed")).await;
    assert!(named, "the TLS failure is named: {}", sidecar.log());
    let log = sidecar.log();
    let line = log
        .lines()
        .find(|l| l.contains("kafka TLS handshake failed"))
        .unwrap_or_default();
    assert!(
        line.contains("ssl.ca.location") && line.contains("certificate verify failed"),
        "the line names the setting to check and the reason: {line}"
    );
    assert!(
        sidecar.wait_exit(Duration::from_millis(100)).await.is_none(),
        "keeps running and retrying"
    );
    let (code, _) = http_get(&format!("http://127.0.0.1:{port}/readyz")).await;
    assert_eq!(code, 503, "not ready while TLS fails");
}
