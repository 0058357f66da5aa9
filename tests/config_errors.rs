//! Invalid configurations: non-zero exit and a message naming the key. No broker needed.

mod common;

use std::process::Command;

fn check(toml: &str, subcommand: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(common::binary())
        .args([subcommand, "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VALID: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"
topics = ["t"]
[app]
url = "http://127.0.0.1:8080/"
"#;

#[test]
fn a_valid_config_passes_check_config_and_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!("{VALID}\n[kafka.properties]\n\"sasl.password\" = \"s3cret\"\n"),
    )
    .unwrap();
    let out = Command::new(common::binary())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("group_id = \"g\""), "{stdout}");
    assert!(!stdout.contains("s3cret"), "secrets are redacted: {stdout}");
}

#[test]
fn invalid_configs_exit_non_zero_with_a_message_naming_the_key() {
    let cases = [
        (format!("{VALID}\n[pipeline]\nwrokers = 3\n"), "pipeline.wrokers"),
        (
            format!("{VALID}\n[pipeline]\nworkers = \"three\"\n"),
            "pipeline.workers",
        ),
        (VALID.replace("brokers = \"127.0.0.1:9092\"", ""), "kafka.brokers"),
        (
            format!("{VALID}\n[app]\ntimeout = \"5 parsecs\"\n").replace("[app]\nurl", "[x]\nurl"),
            "app.timeout",
        ),
        (
            format!("{VALID}\n[shutdown]\ngrace_period = \"forever\"\n"),
            "shutdown.grace_period",
        ),
        // A duration that would overflow the clock when added to "now".
        (
            format!("{VALID}\n[breaker]\ncool_down = \"1000000000 years\"\n"),
            "breaker.cool_down",
        ),
        (
            format!("{VALID}\n[dedup]\ndone_ttl = \"200 years\"\n"),
            "dedup.done_ttl",
        ),
        // librdkafka does not know the property (a typo).
        (
            format!("{VALID}\n[kafka.properties]\n\"sasl.pasword\" = \"x\"\n"),
            "kafka.properties.sasl.pasword",
        ),
        (
            format!("{VALID}\n[dlq.properties]\n\"linger.ms\" = \"later\"\n"),
            "dlq.properties.linger.ms",
        ),
        (format!("{VALID}\n[log]\nlevel = \"info\n"), "config file"),
        (
            VALID.replace("[app]\n", "[app]\nmax_header_bytes = \"100B\"\n"),
            "app.max_header_bytes",
        ),
    ];
    for (toml, key) in &cases {
        for sub in ["check-config", "run"] {
            let (code, stderr) = check(toml, sub);
            assert_ne!(code, 0, "{sub} must fail for {key}");
            assert!(stderr.contains(key), "{sub}: message must name {key}: {stderr}");
        }
    }
}

fn check_env(env: &[(&str, &str)], subcommand: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, VALID).unwrap();
    let out = Command::new(common::binary())
        .args([subcommand, "--config"])
        .arg(&path)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn env_overrides_keep_text_as_text_and_invalid_ones_name_the_key() {
    let (code, stdout, stderr) = check_env(
        &[
            ("KAFKA_SIDECAR_KAFKA__GROUP_ID", "007"),
            ("KAFKA_SIDECAR_PIPELINE__WORKERS", "3"),
            ("KAFKA_SIDECAR_DLQ__PROPERTIES__COMPRESSION_TYPE", "zstd"),
        ],
        "check-config",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("group_id = \"007\""), "{stdout}");
    assert!(stdout.contains("workers = 3"), "{stdout}");
    assert!(stdout.contains("\"compression.type\" = \"zstd\""), "{stdout}");
    for sub in ["check-config", "run"] {
        let (code, _, stderr) = check_env(&[("KAFKA_SIDECAR_APP__TIMEOUT", "1000000000 years")], sub);
        assert_ne!(code, 0, "{sub} must fail");
        assert!(
            stderr.contains("app.timeout") && stderr.contains("at most 100 years"),
            "{sub}: {stderr}"
        );
    }
}

#[test]
fn invalid_retry_topics_exit_non_zero_naming_each_bad_tier_key_in_one_run() {
    let tiers =
        |list: &str| format!("{VALID}\n[dlq]\ntopic = \"dead\"\n[retry_topics]\nenabled = true\ntiers = [{list}]\n");
    let cases = [
        // Delays not strictly increasing, a topic used twice, the source topic, the DLQ.
        (
            tiers(
                r#"{ topic = "r1", delay = "10s" }, { topic = "r1", delay = "5s" }, { topic = "t", delay = "1m" }, { topic = "dead", delay = "2m" }"#,
            ),
            vec![
                "retry_topics.tiers[1].topic",
                "retry_topics.tiers[1].delay",
                "retry_topics.tiers[2].topic",
                "retry_topics.tiers[3].topic",
            ],
        ),
        (
            tiers(r#"{ topic = "r1", delay = "soon" }"#),
            vec!["retry_topics", "soon"],
        ),
        (
            tiers(r#"{ topic = "r1", delay = "1s", dealy = "2s" }"#),
            vec!["retry_topics", "dealy"],
        ),
        (
            format!("{VALID}\n[retry_topics]\nenabled = true\ntiers = [{{ topic = \"r1\", delay = \"1s\" }}]\n"),
            vec!["retry_topics.enabled"],
        ),
        (
            format!("{VALID}\n[dlq]\ntopic = \"dead\"\n[retry_topics]\nenabled = true\nin_place_attempts = 0\n"),
            vec!["retry_topics.tiers", "retry_topics.in_place_attempts"],
        ),
        (
            tiers(r#"{ topic = "r1", delay = "1s" }"#)
                .replace("enabled = true", "enabled = true\npreserve_key_order = true"),
            vec!["retry_topics.preserve_key_order"],
        ),
    ];
    for (toml, keys) in &cases {
        let (code, stderr) = check(toml, "check-config");
        assert_ne!(code, 0, "check-config must fail for {keys:?}");
        for key in keys {
            assert!(stderr.contains(key), "the message must name {key}: {stderr}");
        }
    }
    let (code, stderr) = check(
        &tiers(r#"{ topic = "r1", delay = "1s" }, { topic = "r2", delay = "1m" }"#),
        "check-config",
    );
    assert_eq!(code, 0, "a valid [retry_topics] passes: {stderr}");
}
