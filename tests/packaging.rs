//! Packaging: the Helm chart renders a config.toml that the real binary accepts.
//!
//! Renders the chart's ConfigMap with `helm template` (default values, every optional feature,
//! native-sidecar mode, and the example parent chart that uses the named templates), takes
//! config.toml out of it and runs `kafka-sidecar check-config` on it. Needs helm, which
//! `scripts/check-packaging.sh` installs: without it these tests fail, they never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Kubernetes version to render for (the chart needs 1.29+; a helm built without release
/// flags would assume 1.20).
const KUBE_VERSION: &str = "1.37.0";

/// The repository as cargo names it when it runs the tests, read at run time: a build cached
/// from a checkout at another path must still read this checkout's files.
fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

fn chart() -> PathBuf {
    repo_root().join("helm/kafka-sidecar")
}

/// `$(go env GOPATH)/bin/helm` (where scripts/check-packaging.sh installs it), else `helm` on PATH.
fn helm() -> PathBuf {
    let gopath = Command::new("go")
        .args(["env", "GOPATH"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|p| !p.is_empty());
    let candidates = gopath.map(|p| PathBuf::from(p).join("bin/helm")).into_iter().chain(
        std::env::var_os("PATH").into_iter().flat_map(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("helm"))
                .collect::<Vec<_>>()
        }),
    );
    for candidate in candidates {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "helm not found (neither $(go env GOPATH)/bin/helm nor on PATH): \
         run `bash scripts/check-packaging.sh` once, it installs helm with `go install`"
    );
}

/// `helm template RELEASE CHART ARGS...`; panics with helm's message if it fails.
fn helm_template(chart: &Path, release: &str, args: &[&str]) -> String {
    let out = Command::new(helm())
        .arg("template")
        .arg(release)
        .arg(chart)
        .args(["--namespace", "orders", "--kube-version", KUBE_VERSION])
        .args(args)
        .output()
        .expect("failed to run helm");
    assert!(
        out.status.success(),
        "helm template {} {args:?} failed:\n{}",
        chart.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("helm printed UTF-8")
}

/// The chart's ConfigMap rendered with `args` (values files, --set).
fn render_configmap(args: &[&str]) -> String {
    let mut all = vec!["--show-only", "templates/configmap.yaml"];
    all.extend_from_slice(args);
    helm_template(&chart(), "kafka-sidecar", &all)
}

/// The text of the one `config.toml: |` block scalar in a rendered manifest.
fn config_toml(rendered: &str) -> String {
    let lines: Vec<&str> = rendered.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if !matches!(trimmed, "config.toml: |" | "config.toml: |-") {
            continue;
        }
        let key_indent = line.len() - trimmed.len();
        let mut block_indent = None;
        let mut text = String::new();
        for l in &lines[i + 1..] {
            if l.trim().is_empty() {
                text.push('\n');
                continue;
            }
            let indent = l.len() - l.trim_start().len();
            if indent <= key_indent {
                break;
            }
            let strip = *block_indent.get_or_insert(indent);
            assert!(indent >= strip, "badly indented block scalar:\n{rendered}");
            text.push_str(&l[strip..]);
            text.push('\n');
        }
        found.push(format!("{}\n", text.trim_end()));
    }
    assert_eq!(
        found.len(),
        1,
        "expected exactly one config.toml in the render:\n{rendered}"
    );
    found.remove(0)
}

/// `kafka-sidecar check-config --config FILE` on `toml`, with no KAFKA_SIDECAR_* variables
/// from this environment leaking in.
fn check_config(toml: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kafka-sidecar"));
    cmd.arg("check-config").arg("--config").arg(&path);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KAFKA_SIDECAR_") {
            cmd.env_remove(name);
        }
    }
    cmd.output().expect("failed to run kafka-sidecar")
}

/// Asserts that `toml` is a valid config and returns the effective config check-config prints.
fn assert_valid(what: &str, toml: &str) -> String {
    let out = check_config(toml);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{what}: `kafka-sidecar check-config` rejected the rendered config.toml \
         (exit {:?}):\n{}\n--- config.toml ---\n{toml}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn values(file: &str) -> String {
    chart().join(file).to_string_lossy().into_owned()
}

#[test]
fn default_values_render_a_valid_config() {
    let toml = config_toml(&render_configmap(&[]));
    // Dedup is off by default: its section is left out (the sidecar's default is off too).
    assert!(!toml.contains("[dedup]"), "{toml}");
    let effective = assert_valid("default values", &toml);
    for expected in [
        r#"brokers = "kafka-bootstrap.kafka.svc:9092""#,
        r#"url = "http://127.0.0.1:8080/records""#,
        // The chart owns the admin address: the probes and monitoring use that port.
        r#"listen = "0.0.0.0:9464""#,
        r#"grace_period = "25s""#,
    ] {
        assert!(effective.contains(expected), "{expected} not in:\n{effective}");
    }
}

#[test]
fn all_features_values_render_a_valid_config() {
    let file = values("ci/all-features-values.yaml");
    let toml = config_toml(&render_configmap(&["-f", &file]));
    // Quoted librdkafka keys survive toToml, and whole numbers stay integers (Helm reads
    // numbers as floats; `workers = 32.0` would be rejected).
    assert!(toml.contains(r#""sasl.mechanisms" = "SCRAM-SHA-512""#), "{toml}");
    assert!(toml.contains("workers = 32\n"), "{toml}");
    let effective = assert_valid("ci/all-features-values.yaml", &toml);
    for expected in [
        r#"topics = ["#,
        r#""security.protocol" = "SASL_SSL""#,
        r#""queued.max.messages.kbytes" = "16384""#,
        r#""compression.type" = "zstd""#,
        "workers = 32",
        "max_attempts = 8",
        "resume_threshold = 0.5",
        // Whole numbers for float keys come out as integers and are still accepted.
        "records_per_second = 500.0",
        "per_key_records_per_second = 20.5",
        "failure_ratio = 1.0",
        "min_requests = 50",
        "[dedup]\nenabled = true",
        r#"key = "header:idempotency-key""#,
        "[retry_topics]\nenabled = true",
        "in_place_attempts = 2",
        r#"topic = "orders-retry-1m""#,
    ] {
        assert!(effective.contains(expected), "{expected} not in:\n{effective}");
    }
}

#[test]
fn the_redis_url_comes_from_a_secret_not_the_configmap() {
    let file = values("ci/all-features-values.yaml");
    let configmap = render_configmap(&["-f", &file]);
    assert!(
        !configmap.contains("redis"),
        "a Redis URL in the ConfigMap:\n{configmap}"
    );
    let deployment = helm_template(
        &chart(),
        "kafka-sidecar",
        &["-f", &file, "--show-only", "templates/deployment.yaml"],
    );
    let expected = "- name: KAFKA_SIDECAR_DEDUP__REDIS_URL
              valueFrom:
                secretKeyRef:
                  name: redis-credentials
                  key: url
";
    assert!(deployment.contains(expected), "{expected:?} not in:\n{deployment}");
}

/// Every section and key of config.toml.example appears in values.yaml's `sidecar.config`
/// (set, or commented with its default), so that the chart's documented values cannot fall
/// behind the sidecar's config (config.toml.example is itself checked against the code).
#[test]
fn values_yaml_lists_every_key_of_config_toml_example() {
    let root = repo_root();
    let example: toml::Table = std::fs::read_to_string(root.join("config.toml.example"))
        .unwrap()
        .parse()
        .expect("config.toml.example parses");
    let values = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let sections = values_config_sections(&values);
    let mut missing = Vec::new();
    for (section, keys) in &example {
        let Some(block) = sections.iter().find(|(name, _)| name == section).map(|(_, b)| b) else {
            missing.push(format!("[{section}]"));
            continue;
        };
        for key in keys.as_table().expect("a table per section").keys() {
            let listed = block.lines().any(|l| {
                let l = l.trim_start().trim_start_matches('#').trim_start();
                l.strip_prefix(key.as_str()).is_some_and(|rest| rest.starts_with(':'))
            });
            if !listed {
                missing.push(format!("{section}.{key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "in config.toml.example but not in helm/kafka-sidecar/values.yaml (sidecar.config): {missing:?}"
    );
}

/// `(section, its lines)` of the `config:` map under `sidecar:` in values.yaml: sections are the
/// uncommented keys indented by 4, the block ends at the first line indented by 2 or less.
fn values_config_sections(values: &str) -> Vec<(String, String)> {
    let mut lines = values.lines().skip_while(|l| *l != "sidecar:");
    assert!(lines.any(|l| l == "  config:"), "no sidecar.config in values.yaml");
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in lines {
        let trimmed = line.trim_start();
        if trimmed.is_empty() {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if indent <= 2 {
            break;
        }
        if indent == 4 && !trimmed.starts_with('#') {
            let name = trimmed.split(':').next().unwrap_or_default().to_string();
            sections.push((name, String::new()));
        } else if let Some((_, block)) = sections.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    assert!(!sections.is_empty(), "no sections in sidecar.config of values.yaml");
    sections
}

#[test]
fn dedup_switched_on_with_its_defaults_renders_a_valid_config() {
    let toml = config_toml(&render_configmap(&["--set", "sidecar.config.dedup.enabled=true"]));
    assert!(toml.contains("[dedup]\n  enabled = true\n"), "{toml}");
    let effective = assert_valid("--set sidecar.config.dedup.enabled=true", &toml);
    assert!(effective.contains("[dedup]\nenabled = true\n"), "{effective}");
}

#[test]
fn native_sidecar_values_render_a_valid_config() {
    let file = values("ci/native-sidecar-values.yaml");
    let toml = config_toml(&render_configmap(&["-f", &file]));
    assert_valid("ci/native-sidecar-values.yaml", &toml);
}

#[test]
fn example_parent_chart_renders_a_valid_config() {
    // Usage (b): a chart of its own with kafka-sidecar as a dependency (charts/kafka-sidecar).
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("my-app");
    copy_dir(&chart().join("examples/my-app"), &parent, &[]);
    copy_dir(&chart(), &parent.join("charts/kafka-sidecar"), &["examples", "ci"]);
    let rendered = helm_template(&parent, "my-app", &[]);
    let toml = config_toml(&rendered);
    let effective = assert_valid("examples/my-app", &toml);
    assert!(effective.contains(r#"group_id = "my-app""#), "{effective}");
    // The sidecar container, its volume and the ConfigMap fit together.
    for expected in [
        "name: my-app-kafka-sidecar\n",
        "- name: kafka-sidecar\n",
        "value: /etc/kafka-sidecar/config.toml",
        "mountPath: /etc/kafka-sidecar\n",
        "checksum/kafka-sidecar-config: ",
        "name: KAFKA_SIDECAR_KAFKA__PROPERTIES__SASL_PASSWORD",
    ] {
        assert!(rendered.contains(expected), "{expected:?} not in:\n{rendered}");
    }
}

#[test]
fn the_pod_reads_the_rendered_config_and_rolls_when_it_changes() {
    let deployment = |args: &[&str]| {
        let mut all = vec!["--show-only", "templates/deployment.yaml"];
        all.extend_from_slice(args);
        helm_template(&chart(), "kafka-sidecar", &all)
    };
    let checksum = |rendered: &str| {
        rendered
            .lines()
            .find_map(|l| l.trim().strip_prefix("checksum/kafka-sidecar-config: "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no checksum annotation in:\n{rendered}"))
    };
    let rendered = deployment(&[]);
    // The ConfigMap the volume names is the one templates/configmap.yaml renders, and
    // KAFKA_SIDECAR_CONFIG is the file the volume mounts.
    assert!(render_configmap(&[]).contains("name: kafka-sidecar-config\n"));
    for expected in [
        "configMap:\n            name: kafka-sidecar-config\n",
        "- key: config.toml\n                path: config.toml\n",
        "value: /etc/kafka-sidecar/config.toml\n",
        "mountPath: /etc/kafka-sidecar\n",
    ] {
        assert!(rendered.contains(expected), "{expected:?} not in:\n{rendered}");
    }
    let changed = deployment(&["--set", "sidecar.config.pipeline.workers=8"]);
    assert_ne!(checksum(&rendered), checksum(&changed));
}

#[test]
fn the_member_is_static_by_default_with_the_pod_name_as_its_instance_id() {
    let deployment = |args: &[&str]| {
        let mut all = vec!["--show-only", "templates/deployment.yaml"];
        all.extend_from_slice(args);
        helm_template(&chart(), "kafka-sidecar", &all)
    };
    let env = "- name: KAFKA_SIDECAR_KAFKA__GROUP_INSTANCE_ID\n              valueFrom:\n                fieldRef:\n                  fieldPath: metadata.name\n";
    let rendered = deployment(&[]);
    assert!(rendered.contains(env), "{env:?} not in:\n{rendered}");
    // Off with the switch, and when the config names its own instance id (which then applies).
    let off = deployment(&["--set", "sidecar.staticMembership=false"]);
    assert!(!off.contains("KAFKA_SIDECAR_KAFKA__GROUP_INSTANCE_ID"), "{off}");
    let own = deployment(&["--set", "sidecar.config.kafka.group_instance_id=fixed-1"]);
    assert!(!own.contains("KAFKA_SIDECAR_KAFKA__GROUP_INSTANCE_ID"), "{own}");
    // The sidecar reads the variable into kafka.group_instance_id.
    let toml = config_toml(&render_configmap(&[]));
    let out = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, &toml).unwrap();
        Command::new(env!("CARGO_BIN_EXE_kafka-sidecar"))
            .arg("check-config")
            .arg("--config")
            .arg(&path)
            .env("KAFKA_SIDECAR_KAFKA__GROUP_INSTANCE_ID", "my-app-7d9c5b6f4-x2x9q")
            .output()
            .expect("failed to run kafka-sidecar")
    };
    let effective = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        effective.contains(r#"group_instance_id = "my-app-7d9c5b6f4-x2x9q""#),
        "{effective}"
    );
}

#[test]
fn an_invalid_config_value_is_caught() {
    // The check above is only worth something if check-config rejects what it should.
    let toml = config_toml(&render_configmap(&["--set", "sidecar.config.pipeline.workers=0"]));
    let out = check_config(&toml);
    assert!(!out.status.success(), "workers = 0 was accepted:\n{toml}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pipeline.workers"), "{stderr}");
}

/// Copies a directory tree, leaving out the top-level entries named in `skip`.
fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target, &[]);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn a_unix_socket_app_shares_one_emptydir_with_the_sidecar_and_the_url_must_point_into_it() {
    let url = "sidecar.config.app.url=unix:///var/run/kafka-sidecar-app/app.sock:/records";
    let args = ["--set", "unixSocket.enabled=true", "--set", url];
    let mut all = vec!["--show-only", "templates/deployment.yaml"];
    all.extend_from_slice(&args);
    let rendered = helm_template(&chart(), "kafka-sidecar", &all);
    assert!(
        rendered.contains("- name: app-socket\n          emptyDir: {}\n"),
        "no emptyDir for the socket in:\n{rendered}"
    );
    let mount = "- name: app-socket\n              mountPath: /var/run/kafka-sidecar-app\n";
    assert_eq!(
        rendered.matches(mount).count(),
        2,
        "mounted in the app and the sidecar:\n{rendered}"
    );
    let effective = assert_valid("unixSocket", &config_toml(&render_configmap(&args)));
    assert!(
        effective.contains(r#"url = "unix:///var/run/kafka-sidecar-app/app.sock:/records""#),
        "{effective}"
    );
    // Off by default: no socket volume.
    let default = helm_template(&chart(), "kafka-sidecar", &["--show-only", "templates/deployment.yaml"]);
    assert!(!default.contains("app-socket"), "{default}");
    // A URL that does not point into the shared directory fails the render.
    let out = Command::new(helm())
        .args(["template", "kafka-sidecar"])
        .arg(chart())
        .args(["--set", "unixSocket.enabled=true"])
        .output()
        .expect("failed to run helm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an http:// app.url with unixSocket.enabled rendered"
    );
    assert!(
        stderr.contains("unixSocket.enabled: sidecar.config.app.url"),
        "{stderr}"
    );
}

/// docs/kubernetes.md has a runbook row (what it means, what to do) for every shipped alert,
/// and names no alert that is not shipped.
#[test]
fn every_shipped_alert_has_a_runbook_row_and_the_runbook_names_no_other() {
    let root = repo_root();
    let alerts = std::fs::read_to_string(chart().join("files/alerts.yaml")).expect("alerts.yaml");
    let shipped: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(shipped.len() >= 10, "alerts found in alerts.yaml: {shipped:?}");
    let docs = std::fs::read_to_string(root.join("docs/kubernetes.md")).expect("docs/kubernetes.md");
    let runbook: Vec<&str> = docs
        .lines()
        .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
        .filter(|name| name.starts_with("KafkaSidecar"))
        .collect();
    for alert in &shipped {
        let rows: Vec<&str> = docs
            .lines()
            .filter(|l| l.starts_with(&format!("| `{alert}`")))
            .collect();
        assert_eq!(rows.len(), 1, "docs/kubernetes.md needs one runbook row for {alert}");
        // | name | means | do |: both explanations are there.
        let cells: Vec<&str> = rows[0].split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
        assert!(
            cells.len() == 3 && cells[1].len() > 20 && cells[2].len() > 20,
            "the runbook row of {alert} needs what it means and what to do: {}",
            rows[0]
        );
    }
    for name in &runbook {
        assert!(
            shipped.contains(name),
            "the runbook names {name}, which alerts.yaml does not ship"
        );
    }
}
