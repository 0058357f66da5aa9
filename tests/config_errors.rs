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
