//! Secrets never reach an output. Each kind of secret is a unique string fed through the
//! config (file and environment); every output of the real binary is searched for all of
//! them: `check-config` stdout and stderr, `run` stderr for a run that fails on a bad
//! property and for a run that starts and delivers, and that run's `/status` and `/metrics`.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::redis_server::TestRedis;
use common::*;

/// `kafka.properties."sasl.password"`.
const SASL_PASSWORD: &str = "sasl-pw-Q7xk2";
/// A misspelled `kafka.properties."sasl.pasword"`: not known to be a secret by its name.
const TYPO_PASSWORD: &str = "typo-pw-Z9m3";
/// `ssl.key.password` (in `[dlq.properties]` for the run that starts, else in `[kafka.properties]`).
const SSL_KEY_PASSWORD: &str = "sslkey-pw-H4n8";
/// The password in `app.url`.
const APP_URL_PASSWORD: &str = "app-pw-M2v5";
/// The password in `app.health_url`.
const HEALTH_URL_PASSWORD: &str = "health-pw-K8w1";
/// `app.headers.Authorization`, after "Bearer ".
const HEADER_TOKEN: &str = "hdr-tok-P3q6";
/// The password in `dedup.redis_url`.
const REDIS_PASSWORD: &str = "redis-pw-T5r9";
/// The password in `telemetry.otlp_endpoint`.
const OTLP_URL_PASSWORD: &str = "otel-pw-B6j2";
/// A value in `OTEL_EXPORTER_OTLP_HEADERS`.
const OTLP_HEADER_TOKEN: &str = "otel-hdr-W1c7";

/// `Authorization: Basic` of app.url and app.health_url: base64 of "user:password".
const APP_BASIC_AUTH: &str = "YXBwLXVzZXI6YXBwLXB3LU0ydjU";
const HEALTH_BASIC_AUTH: &str = "aGVhbHRoLXVzZXI6aGVhbHRoLXB3LUs4dzE";

const SECRETS: [&str; 11] = [
    APP_BASIC_AUTH,
    HEALTH_BASIC_AUTH,
    SASL_PASSWORD,
    TYPO_PASSWORD,
    SSL_KEY_PASSWORD,
    APP_URL_PASSWORD,
    HEALTH_URL_PASSWORD,
    HEADER_TOKEN,
    REDIS_PASSWORD,
    OTLP_URL_PASSWORD,
    OTLP_HEADER_TOKEN,
];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} shows the secret {secret:?}:\n{text}");
    }
}

/// Every secret in a config that loads (no typo). `app_port`: the app (and its /health).
fn config(app_port: u16, redis_port: u16, extra: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
commit_interval = "500ms"
session_timeout = "10s"

[kafka.properties]
"sasl.password" = "{SASL_PASSWORD}"

[app]
url = "http://app-user:{APP_URL_PASSWORD}@127.0.0.1:{app_port}/records"
health_url = "http://health-user:{HEALTH_URL_PASSWORD}@127.0.0.1:{app_port}/health"
timeout = "1s"

[app.headers]
Authorization = "Bearer {HEADER_TOKEN}"

[retry]
initial_backoff = "50ms"
max_backoff = "500ms"

[dlq.properties]
"ssl.key.password" = "{SSL_KEY_PASSWORD}"

[dedup]
enabled = true
redis_url = "redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_port}/0"
prefix = "{prefix}"

[telemetry]
otlp_endpoint = "http://otel-user:{OTLP_URL_PASSWORD}@127.0.0.1:9/v1/traces"
{extra}
"#,
        brokers = brokers(),
        group = unique("secrets-group"),
        topic = unique("secrets"),
        prefix = unique("secrets"),
    )
}

fn otlp_headers_env() -> (&'static str, String) {
    (
        "OTEL_EXPORTER_OTLP_HEADERS",
        format!("authorization=Bearer%20{OTLP_HEADER_TOKEN},x-tenant=t1"),
    )
}

fn run_binary(subcommand: &str, toml: &str, env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let (otel_name, otel_value) = otlp_headers_env();
    Command::new(binary())
        .args([subcommand, "--config"])
        .arg(&path)
        .env("RUST_LOG", "debug")
        .env(otel_name, otel_value)
        .envs(env.iter().copied())
        .output()
        .expect("run kafka-sidecar")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_the_config_with_every_secret_redacted() {
    let toml = config(8080, 6379, "");
    let out = run_binary(
        "check-config",
        &toml,
        &[("KAFKA_SIDECAR_KAFKA__PROPERTIES__SSL_KEY_PASSWORD", SSL_KEY_PASSWORD)],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "check-config must accept the config: {stderr}");
    // The keys are printed, so their values were really considered and hidden.
    for key in [
        "\"sasl.password\"",
        "\"ssl.key.password\"",
        "health_url",
        "Authorization",
        "redis_url",
        "otlp_endpoint",
    ] {
        assert!(stdout.contains(key), "{key} missing from:\n{stdout}");
    }
    assert!(stdout.contains("<redacted>"), "{stdout}");
    assert_no_secret("check-config stdout", &stdout);
    assert_no_secret("check-config stderr", &stderr);
}

#[test]
fn a_misspelled_property_fails_check_config_and_run_naming_the_key_without_its_value() {
    let valid = format!("\"sasl.password\" = \"{SASL_PASSWORD}\"");
    let toml = config(8080, 6379, "").replace(&valid, &format!("{valid}\n\"sasl.pasword\" = \"{TYPO_PASSWORD}\""));
    assert!(toml.contains(TYPO_PASSWORD) && toml.contains(SASL_PASSWORD), "{toml}");
    for sub in ["check-config", "run"] {
        let out = run_binary(sub, &toml, &[]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "{sub} must reject a misspelled property");
        assert!(
            stderr.contains("kafka.properties.sasl.pasword"),
            "{sub} must name the key: {stderr}"
        );
        assert_no_secret(&format!("{sub} stdout"), &stdout);
        assert_no_secret(&format!("{sub} stderr"), &stderr);
    }
}

#[test]
fn a_syntax_error_on_a_secret_line_is_reported_without_the_line() {
    let toml = format!("{}\n[log]\nlevel = \"info\n", config(8080, 6379, "")).replace(
        &format!("\"sasl.password\" = \"{SASL_PASSWORD}\""),
        &format!("\"sasl.password\" = \"{SASL_PASSWORD}"),
    );
    for sub in ["check-config", "run"] {
        let out = run_binary(sub, &toml, &[]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success());
        assert!(stderr.contains("config file: is not valid TOML at line"), "{stderr}");
        assert_no_secret(&format!("{sub} stdout"), &stdout);
        assert_no_secret(&format!("{sub} stderr"), &stderr);
    }
}

#[test]
fn a_run_that_fails_creating_its_kafka_client_shows_no_secret() {
    // Valid property by property, refused by librdkafka when the client is created.
    let toml = config(8080, 6379, "").replace(
        &format!("\"sasl.password\" = \"{SASL_PASSWORD}\""),
        &format!(
            "\"sasl.password\" = \"{SASL_PASSWORD}\"\n\"security.protocol\" = \"SSL\"\n\
             \"ssl.key.location\" = \"/nonexistent/{SSL_KEY_PASSWORD}.pem\"\n\"ssl.key.password\" = \"{SSL_KEY_PASSWORD}\""
        ),
    );
    for format in ["text", "json"] {
        let out = run_binary("run", &toml, &[("KAFKA_SIDECAR_LOG__FORMAT", format)]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "run must fail: {stderr}");
        assert!(stderr.contains("invalid Kafka consumer settings"), "{stderr}");
        assert!(
            stderr.contains("<redacted>"),
            "URLs with passwords are logged redacted: {stderr}"
        );
        assert_no_secret(&format!("run stdout ({format} logs)"), &stdout);
        assert_no_secret(&format!("run stderr ({format} logs)"), &stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sidecar_shows_no_secret_in_logs_status_or_metrics() {
    require_kafka();
    let redis = TestRedis::start(&["--requirepass", REDIS_PASSWORD]);
    // The first attempt of "slow" times out (app.timeout = 1s) and is retried.
    let app = TestApp::start(|r| {
        if r.value_str() == "slow" && r.attempt == 1 {
            Answer {
                delay: Duration::from_secs(3),
                ..Answer::ok()
            }
        } else {
            Answer::ok()
        }
    })
    .await;
    let admin = free_port();
    let toml = config(
        app.port,
        redis.port,
        &format!("[admin]\nlisten = \"127.0.0.1:{admin}\"\nlag_interval = \"300ms\"\n"),
    );
    let topic = toml
        .lines()
        .find_map(|l| l.strip_prefix("topics = [\""))
        .unwrap()
        .trim_end_matches("\"]")
        .to_string();
    let group = toml
        .lines()
        .find_map(|l| l.strip_prefix("group_id = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    create_topic(&topic, 1).await;
    produce(
        &topic,
        vec![
            Out::keyed("k1", "fast"),
            Out::keyed("k2", "slow"),
            Out::keyed("k3", "fast"),
        ],
    )
    .await;

    let (otel_name, otel_value) = otlp_headers_env();
    let mut sidecar = Sidecar::start_with_env(
        &toml,
        &[
            ("RUST_LOG", "kafka_sidecar=debug,librdkafka=debug,info"),
            (otel_name, &otel_value),
            ("KAFKA_SIDECAR_KAFKA__PROPERTIES__SASL_PASSWORD", SASL_PASSWORD),
        ],
    );
    let delivered = wait_until(Duration::from_secs(60), || app.delivered_count() >= 3).await;
    assert!(delivered, "3 records delivered, got {}", app.delivered_count());
    let (committed, ends) = wait_committed_to_end(&group, &topic, 1, Duration::from_secs(30)).await;
    assert_eq!(committed, ends, "everything committed");
    // The app goes away for a moment: "app unreachable" is logged with the connection error,
    // which must not name the credentials either.
    app.stop();
    produce(&topic, vec![Out::keyed("k4", "after the outage")]).await;
    let logged = wait_until(Duration::from_secs(30), || sidecar.log().contains("app unreachable")).await;
    assert!(logged, "the outage was logged: {}", sidecar.log());
    let app = app.restart().await;
    assert!(
        wait_until(Duration::from_secs(60), || app.delivered_count() >= 4).await,
        "delivered after the outage"
    );
    // The credentials were used, not only hidden (the URL's userinfo is sent as Basic
    // auth, which takes the place of the configured Authorization header).
    assert!(app.requests()[0].headers.contains_key("authorization"));

    let (status, body) = http_get(&format!("http://127.0.0.1:{admin}/status")).await;
    assert_eq!(status, 200);
    assert_no_secret("/status", &body);
    let (status, body) = http_get(&format!("http://127.0.0.1:{admin}/metrics")).await;
    assert_eq!(status, 200);
    assert!(body.contains("kafka_sidecar_"), "{body}");
    assert_no_secret("/metrics", &body);

    sidecar.signal(nix::sys::signal::Signal::SIGTERM);
    let exit = sidecar.wait_exit(Duration::from_secs(30)).await;
    assert!(exit.is_some_and(|s| s.success()), "clean exit: {exit:?}");
    let log = sidecar.log();
    assert!(log.contains("joining the consumer group"), "the health gate ran: {log}");
    assert!(
        log.contains("<redacted>"),
        "URLs with passwords were logged redacted: {log}"
    );
    assert_no_secret("run stderr", &log);
}
