//! DLQ redrive (`kafka-sidecar dlq inspect|replay`): the real binary, the real broker, a real app.
//!
//! Poison records go to the DLQ through the real sidecar; once the app is "fixed", `dlq replay`
//! sends them back and the sidecar delivers each exactly once. Dry runs, filters, a second
//! run, the loop guard, `inspect`'s output, hostile dead letters and bad arguments are
//! covered too.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const MINUTE: Duration = Duration::from_secs(60);

/// What a `dlq` command did.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    raw_stdout: Vec<u8>,
}

impl Run {
    /// The number after `name: ` in the summary (fails the test when absent).
    fn count(&self, name: &str) -> u64 {
        let prefix = format!("{name}: ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{name}:` line in the summary:\n{self:?}"))
    }

    fn assert_ok(&self) {
        assert_eq!(self.code, Some(0), "the command succeeds: {self:?}");
    }
}

/// Runs `kafka-sidecar dlq ARGS` (killed after two minutes: a hang fails the test).
fn dlq_cmd(args: &[&str]) -> Run {
    let mut child = Command::new(binary())
        .arg("dlq")
        .args(args)
        .env_remove("KAFKA_SIDECAR_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kafka-sidecar dlq");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().expect("try_wait").is_some() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("output");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        raw_stdout: out.stdout,
    }
}

/// A config file for the `dlq` commands (and the sidecar).
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(toml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        Self { _dir: dir, path }
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }
}

fn replay(config: &ConfigFile, extra: &[&str]) -> Run {
    let mut args = vec!["replay", "--config", config.path()];
    args.extend_from_slice(extra);
    dlq_cmd(&args)
}

/// A dead letter as the sidecar writes it, pointing at `source` partition 0.
fn letter(source: &str, offset: i64, class: &str, value: &str) -> Out {
    let mut out = Out::keyed(format!("key-{offset}"), value);
    out.headers = vec![
        ("app-header".into(), format!("h-{offset}")),
        ("x-dlq-source-topic".into(), source.into()),
        ("x-dlq-source-partition".into(), "0".into()),
        ("x-dlq-source-offset".into(), offset.to_string()),
        ("x-dlq-source-timestamp".into(), "1700000000000".into()),
        ("x-dlq-consumer-group".into(), "some-group".into()),
        ("x-dlq-attempts".into(), "1".into()),
        ("x-dlq-error-class".into(), class.into()),
        ("x-dlq-error-message".into(), format!("app answered {class}")),
    ];
    out.partition = Some(0);
    out
}

/// A source topic and a DLQ topic (one partition each), and a config naming both.
async fn topics(prefix: &str, app: &TestApp) -> (String, String, SidecarConfig) {
    let topic = unique(prefix);
    let dlq = unique(&format!("{prefix}-dlq"));
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;
    let mut cfg = SidecarConfig::new(&topic, app);
    cfg.dlq = Some(dlq.clone());
    (topic, dlq, cfg)
}

fn header<'a>(r: &'a Request, name: &str) -> Vec<&'a [u8]> {
    r.record_headers
        .iter()
        .filter(|(n, _)| n == name.as_bytes())
        .filter_map(|(_, v)| v.as_deref())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_poison_records_replayed_after_the_fix_reach_the_app_exactly_once_with_replay_headers() {
    require_kafka();
    let fixed = Arc::new(AtomicBool::new(false));
    let f = fixed.clone();
    let app = TestApp::start(move |_| {
        if f.load(Ordering::SeqCst) {
            Answer::ok()
        } else {
            Answer::status(422)
        }
    })
    .await;
    let (topic, dlq, cfg) = topics("redrive-main", &app).await;
    let records = (0..100)
        .map(|i| Out::keyed(format!("k{i}"), format!("rec-{i}")))
        .collect();
    produce(&topic, records).await;
    let sidecar = Sidecar::start(&cfg);
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 1, MINUTE).await;
    assert_eq!(
        committed,
        ends,
        "the poison records are dead-lettered\n{}",
        sidecar.log()
    );
    assert_eq!(end_offsets(&dlq, 1), vec![100], "every poison record is in the DLQ");
    assert_eq!(app.delivered_count(), 0);

    fixed.store(true, Ordering::SeqCst);
    let config = ConfigFile::new(&cfg.toml());
    let run = replay(&config, &[]);
    run.assert_ok();
    assert_eq!(
        (run.count("read"), run.count("replayed"), run.count("skipped")),
        (100, 100, 0),
        "{run:?}"
    );
    assert!(
        run.stdout.contains(&format!("replay group: {}-dlq-replay", cfg.group)),
        "{run:?}"
    );

    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 100).await,
        "the replayed records reach the app: {} of 100\n{}",
        app.delivered_count(),
        sidecar.log()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 1, MINUTE).await;
    assert_eq!(committed, ends);
    let delivered = app.delivered();
    let mut values: Vec<String> = delivered.iter().map(Request::value_str).collect();
    values.sort();
    let mut expected: Vec<String> = (0..100).map(|i| format!("rec-{i}")).collect();
    expected.sort();
    assert_eq!(values, expected, "each record reaches the app exactly once");
    for r in &delivered {
        assert!(r.offset >= 100, "a replayed copy, not the original: {r:?}");
        let from = header(r, "x-dlq-replayed-from");
        assert_eq!(from.len(), 1, "one x-dlq-replayed-from: {r:?}");
        let from = String::from_utf8_lossy(from[0]).into_owned();
        assert!(from.starts_with(&format!("{dlq}/0/")), "{from}");
        assert_eq!(header(r, "x-dlq-replay-count"), vec![&b"1"[..]]);
        assert!(
            header(r, "x-dlq-source-topic").is_empty(),
            "old x-dlq-* headers are stripped: {r:?}"
        );
        let n: usize = r.value_str().trim_start_matches("rec-").parse().unwrap();
        assert_eq!(r.key.as_deref(), Some(format!("k{n}").as_bytes()), "the original key");
    }
    assert_eq!(
        committed_on(&brokers(), &format!("{}-dlq-replay", cfg.group), &dlq, 1),
        vec![100],
        "the replay group committed its position"
    );

    let again = replay(&config, &[]);
    again.assert_ok();
    assert_eq!(
        (again.count("read"), again.count("replayed")),
        (0, 0),
        "a second run moves nothing: {again:?}"
    );
    assert_eq!(
        end_offsets(&topic, 1),
        vec![200],
        "nothing more was written to the source topic"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_writes_and_commits_nothing_and_a_real_run_afterwards_replays_everything() {
    require_kafka();
    let app = TestApp::start(|_| Answer::ok()).await;
    let (topic, dlq, cfg) = topics("redrive-dry", &app).await;
    produce(
        &dlq,
        (0..10)
            .map(|i| letter(&topic, i, "http_422", &format!("v{i}")))
            .collect(),
    )
    .await;
    let config = ConfigFile::new(&cfg.toml());

    let dry = replay(&config, &["--dry-run"]);
    dry.assert_ok();
    assert_eq!((dry.count("would replay"), dry.count("replayed")), (10, 0), "{dry:?}");
    assert_eq!(end_offsets(&topic, 1), vec![0], "a dry run writes nothing");
    assert_eq!(
        committed(&format!("{}-dlq-replay", cfg.group), &dlq, 1),
        vec![-1],
        "a dry run commits nothing"
    );

    let run = replay(&config, &[]);
    run.assert_ok();
    assert_eq!(run.count("replayed"), 10, "{run:?}");
    assert_eq!(end_offsets(&topic, 1), vec![10]);
    let written = read_all(&topic, 1);
    for (i, r) in written.iter().enumerate() {
        assert_eq!(r.value.as_deref(), Some(format!("v{i}").as_bytes()), "in DLQ order");
        assert_eq!(r.key.as_deref(), Some(format!("key-{i}").as_bytes()));
        assert_eq!(
            r.headers.get("app-header"),
            Some(&format!("h-{i}")),
            "the record's own headers stay"
        );
        assert_eq!(r.headers.get("x-dlq-replayed-from"), Some(&format!("{dlq}/0/{i}")));
        assert!(!r.headers.contains_key("x-dlq-error-class"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_replay_moves_only_the_matching_class_and_each_selection_keeps_its_own_position() {
    require_kafka();
    let app = TestApp::start(|_| Answer::ok()).await;
    let (topic, dlq, cfg) = topics("redrive-filter", &app).await;
    let letters = (0..20)
        .map(|i| {
            let class = if i % 2 == 0 { "http_422" } else { "http_400" };
            letter(&topic, i, class, &format!("{class}-{i}"))
        })
        .collect();
    produce(&dlq, letters).await;
    let sidecar = Sidecar::start(&cfg);
    let config = ConfigFile::new(&cfg.toml());

    let run = replay(&config, &["--filter", "error_class=http_422"]);
    run.assert_ok();
    assert_eq!(
        (run.count("read"), run.count("replayed"), run.count("skipped filtered")),
        (20, 10, 10),
        "{run:?}"
    );
    assert!(
        wait_until(MINUTE, || app.delivered_count() >= 10).await,
        "{}",
        sidecar.log()
    );
    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 1, MINUTE).await;
    assert_eq!(committed, ends);
    let delivered = app.delivered();
    assert_eq!(delivered.len(), 10);
    assert!(
        delivered.iter().all(|r| r.value_str().starts_with("http_422-")),
        "only the matching class: {:?}",
        delivered.iter().map(Request::value_str).collect::<Vec<_>>()
    );

    let again = replay(&config, &["--filter", "error_class=http_422"]);
    again.assert_ok();
    assert_eq!(
        again.count("replayed"),
        0,
        "the same selection continues where it stopped: {again:?}"
    );

    let other = replay(&config, &["--filter", "status=400"]);
    other.assert_ok();
    assert_eq!(
        (other.count("replayed"), other.count("skipped filtered")),
        (10, 10),
        "another selection has its own position: {other:?}"
    );
    assert_eq!(end_offsets(&topic, 1), vec![20]);
    assert!(wait_until(MINUTE, || app.delivered_count() >= 20).await);
    assert_each_offset_once(&app.delivered(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_stops_a_run_early_and_the_next_run_continues_after_it() {
    require_kafka();
    let app = TestApp::start(|_| Answer::ok()).await;
    let (topic, dlq, cfg) = topics("redrive-limit", &app).await;
    produce(
        &dlq,
        (0..5)
            .map(|i| letter(&topic, i, "http_422", &format!("v{i}")))
            .collect(),
    )
    .await;
    let config = ConfigFile::new(&cfg.toml());
    for (expected, end) in [(2, 2), (2, 4), (1, 5), (0, 5)] {
        let run = replay(&config, &["--limit", "2", "--rate", "1000"]);
        run.assert_ok();
        assert_eq!(run.count("replayed"), expected, "{run:?}");
        assert_eq!(end_offsets(&topic, 1), vec![end]);
    }
    let values: Vec<_> = read_all(&topic, 1).into_iter().map(|r| r.value).collect();
    let expected: Vec<_> = (0..5).map(|i| Some(format!("v{i}").into_bytes())).collect();
    assert_eq!(values, expected, "each dead letter once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_keeps_failing_is_replayed_at_most_max_replays_times_then_reported() {
    require_kafka();
    // The app is never fixed: every replay is dead-lettered again.
    let app = TestApp::start(|_| Answer::status(422)).await;
    let (topic, dlq, cfg) = topics("redrive-loop", &app).await;
    produce(&topic, vec![Out::keyed("k", "always-poison")]).await;
    let sidecar = Sidecar::start(&cfg);
    let config = ConfigFile::new(&cfg.toml());
    let dlq_len = |n: i64| {
        let dlq = dlq.clone();
        move || end_offsets(&dlq, 1) == vec![n]
    };
    assert!(wait_until(MINUTE, dlq_len(1)).await, "{}", sidecar.log());

    for n in 1..=2 {
        let run = replay(&config, &["--max-replays", "2"]);
        run.assert_ok();
        assert_eq!(run.count("replayed"), 1, "replay {n}: {run:?}");
        assert!(
            wait_until(MINUTE, dlq_len(n + 1)).await,
            "re-dead-lettered\n{}",
            sidecar.log()
        );
    }
    let letters = read_all(&dlq, 1);
    let last = letters.last().expect("the newest dead letter");
    let count = |name: &str| last.raw_headers.iter().filter(|(k, _)| k == name.as_bytes()).count();
    assert_eq!(last.headers.get("x-dlq-replay-count").map(String::as_str), Some("2"));
    assert_eq!(last.headers.get("x-dlq-replayed-from"), Some(&format!("{dlq}/0/1")));
    assert_eq!(
        last.headers.get("x-dlq-source-offset").map(String::as_str),
        Some("2"),
        "fresh source coordinates: the second replayed copy"
    );
    for name in [
        "x-dlq-source-topic",
        "x-dlq-source-offset",
        "x-dlq-error-class",
        "x-dlq-replay-count",
    ] {
        assert_eq!(count(name), 1, "{name} once, so the history is unambiguous: {last:?}");
    }

    let guarded = replay(&config, &["--max-replays", "2"]);
    guarded.assert_ok();
    assert_eq!(
        (
            guarded.count("read"),
            guarded.count("replayed"),
            guarded.count("skipped loop guard")
        ),
        (1, 0, 1),
        "{guarded:?}"
    );
    assert!(
        guarded
            .stdout
            .contains(&format!("loop guard: {dlq}/0/2 (source {topic}/0/2, replayed 2 times)")),
        "the skipped record is reported: {guarded:?}"
    );
    assert_eq!(end_offsets(&topic, 1), vec![3], "nothing more is written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_the_dead_letters_as_a_table_and_as_json_and_moves_no_position() {
    require_kafka();
    let app = TestApp::start(|_| Answer::ok()).await;
    let (topic, dlq, cfg) = topics("redrive-inspect", &app).await;
    let mut letters: Vec<Out> = (0..3)
        .map(|i| letter(&topic, i, "http_422", &format!("{{\"id\":{i}}}")))
        .collect();
    letters.extend((3..5).map(|i| letter(&topic, i, "http_400", "bad\u{1b}[2Jvalue\u{7}")));
    produce(&dlq, letters).await;
    let config = ConfigFile::new(&cfg.toml());

    let json = dlq_cmd(&["inspect", "--config", config.path(), "--format", "json"]);
    json.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).expect("inspect --format json prints JSON");
    assert_eq!(doc["dlq_topic"], serde_json::json!(dlq));
    assert_eq!((doc["total"].as_u64(), doc["shown"].as_u64()), (Some(5), Some(5)));
    assert_eq!(
        doc["by_error_class"],
        serde_json::json!([{"error_class": "http_422", "count": 3}, {"error_class": "http_400", "count": 2}])
    );
    let first = &doc["records"][0];
    assert_eq!(first["source_topic"], serde_json::json!(topic));
    assert_eq!(
        (first["source_partition"].as_i64(), first["source_offset"].as_i64()),
        (Some(0), Some(0))
    );
    assert_eq!(
        (first["status"].as_u64(), first["attempts"].as_u64()),
        (Some(422), Some(1))
    );
    assert_eq!(first["value_preview"], serde_json::json!("{\"id\":0}"));
    assert_eq!(
        doc["records"][3]["value_preview"],
        serde_json::json!("bad\\u{1b}[2Jvalue\\u{7}"),
        "control characters are escaped"
    );

    let table = dlq_cmd(&["inspect", "--config", config.path(), "--limit", "2"]);
    table.assert_ok();
    assert!(
        table.stdout.contains(&format!("DLQ {dlq}: 5 dead letters (showing 2)")),
        "{table:?}"
    );
    assert!(table.stdout.contains("ERROR CLASS"), "{table:?}");
    assert!(table.stdout.contains(&format!("{topic}/0/1")), "{table:?}");
    let counts: Vec<&str> = table.stdout.lines().skip_while(|l| *l != "by error class:").collect();
    assert_eq!(counts.len(), 3, "{table:?}");
    assert!(
        counts[1].contains("http_422") && counts[1].trim_end().ends_with(" 3"),
        "{counts:?}"
    );
    assert!(
        counts[2].contains("http_400") && counts[2].trim_end().ends_with(" 2"),
        "{counts:?}"
    );

    assert_eq!(
        committed(&format!("{}-dlq-replay", cfg.group), &dlq, 1),
        vec![-1],
        "inspect commits nothing for the replay group"
    );
    let run = replay(&config, &["--dry-run"]);
    assert_eq!(
        run.count("would replay"),
        5,
        "inspect did not move the replay position: {run:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_dead_letters_crash_neither_command_and_are_skipped_with_a_reason() {
    require_kafka();
    let app = TestApp::start(|_| Answer::ok()).await;
    let (topic, dlq, cfg) = topics("redrive-hostile", &app).await;
    let h = |n: &[u8], v: Option<&[u8]>| (n.to_vec(), v.map(<[u8]>::to_vec));
    let hostile = vec![
        // No headers at all, no key, no value.
        RawOut::default(),
        // Garbage, non-UTF-8 and null x-dlq-* headers and a terminal escape in the class.
        RawOut {
            key: Some(b"\xff\x00key".to_vec()),
            value: Some(b"\x1b]0;owned\x07\x1b[2J\xc2\x9b\xff".to_vec()),
            headers: vec![
                h(b"x-dlq-source-topic", Some(b"\xff\xfe")),
                h(b"x-dlq-source-partition", Some(b"minus one")),
                h(b"x-dlq-source-offset", None),
                h(b"x-dlq-error-class", Some(b"http_\x1b[31m422")),
                h(b"x-dlq-attempts", Some(b"99999999999999999999")),
                h(b"\xff\xfe-name", Some(b"v")),
            ],
        },
        // A source topic that is no topic name.
        RawOut {
            key: None,
            value: Some(b"v".to_vec()),
            headers: vec![h(b"x-dlq-source-topic", Some(b"../../etc/passwd"))],
        },
        // A garbage replay count: the loop guard cannot vouch for it.
        RawOut {
            key: None,
            value: Some(b"v".to_vec()),
            headers: vec![
                h(b"x-dlq-source-topic", Some(topic.as_bytes())),
                h(b"x-dlq-replay-count", Some(b"\xff")),
            ],
        },
        // A dead letter written without its value.
        RawOut {
            key: Some(b"k".to_vec()),
            value: None,
            headers: vec![
                h(b"x-dlq-source-topic", Some(topic.as_bytes())),
                h(b"x-dlq-dropped", Some(b"value")),
            ],
        },
        // A good one, with a non-UTF-8 header name of its own and a null header.
        RawOut {
            key: Some(b"good-key".to_vec()),
            value: Some(b"good-value".to_vec()),
            headers: vec![
                h(b"\xc3\x28own", Some(b"\x00\x01")),
                h(b"nullable", None),
                h(b"x-dlq-source-topic", Some(topic.as_bytes())),
                h(b"x-dlq-source-partition", Some(b"0")),
                h(b"x-dlq-error-class", Some(b"http_422")),
            ],
        },
    ];
    for result in produce_raw(&dlq, hostile).await {
        result.expect("the broker takes the hostile dead letter");
    }
    let config = ConfigFile::new(&cfg.toml());

    for format in ["table", "json"] {
        let run = dlq_cmd(&["inspect", "--config", config.path(), "--format", format]);
        run.assert_ok();
        let control: Vec<u8> = run
            .raw_stdout
            .iter()
            .copied()
            .filter(|b| *b < 0x20 && *b != b'\n')
            .collect();
        assert!(
            control.is_empty(),
            "no control bytes reach the terminal ({format}): {control:?}\n{run:?}"
        );
        assert!(!run.stdout.contains('\u{9b}'), "no C1 control either ({format})");
        if format == "json" {
            let doc: serde_json::Value = serde_json::from_str(&run.stdout).expect("JSON");
            assert_eq!(doc["total"].as_u64(), Some(6));
            assert_eq!(
                doc["records"][1]["error_class"],
                serde_json::json!("http_\\u{1b}[31m422")
            );
            assert_eq!(doc["records"][1]["source_topic"], serde_json::json!("\\xff\\xfe"));
            assert_eq!(doc["records"][1]["attempts"], serde_json::Value::Null);
        }
    }

    let run = replay(&config, &[]);
    run.assert_ok();
    assert_eq!(
        (
            run.count("read"),
            run.count("replayed"),
            run.count("skipped no source"),
            run.count("skipped bad replay count"),
            run.count("skipped incomplete"),
        ),
        (6, 1, 3, 1, 1),
        "{run:?}"
    );
    let written = read_all(&topic, 1);
    assert_eq!(written.len(), 1);
    let good = &written[0];
    assert_eq!(
        (good.key.as_deref(), good.value.as_deref()),
        (Some(&b"good-key"[..]), Some(&b"good-value"[..]))
    );
    let raw: Vec<_> = good.raw_headers.iter().take(2).cloned().collect();
    assert_eq!(
        raw,
        vec![h(b"\xc3\x28own", Some(b"\x00\x01")), h(b"nullable", None)],
        "the record's own headers, byte for byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_bad_config_and_unreachable_brokers_exit_non_zero_with_a_clear_message() {
    require_kafka();
    let app = TestApp::start(|_| Answer::ok()).await;
    let (_topic, _dlq, cfg) = topics("redrive-errors", &app).await;
    let config = ConfigFile::new(&cfg.toml());
    let missing = unique("redrive-missing-dlq");
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--filter", "colour=red"], 2, "unknown key \"colour\""),
        (&["--filter", "error_class"], 2, "expected KEY=VALUE"),
        (&["--since", "last tuesday"], 2, "--since"),
        (&["--until", "2026-13-40T00:00:00Z"], 2, "--until"),
        (&["--rate", "0"], 2, "--rate"),
        (&["--to", "no such topic"], 2, "--to"),
        (&["--dlq", &missing], 1, "does not exist"),
        (&["--limit", "many"], 2, "--limit"),
    ];
    for (args, code, message) in cases {
        let run = replay(&config, args);
        assert_eq!(run.code, Some(*code), "{args:?}: {run:?}");
        assert!(
            run.stderr.contains(message),
            "{args:?} names the problem ({message}): {run:?}"
        );
    }
    let run = dlq_cmd(&["inspect", "--config", config.path(), "--format", "yaml"]);
    assert_eq!(run.code, Some(2), "{run:?}");

    let mut no_dlq = cfg.clone();
    no_dlq.dlq = None;
    let no_dlq = ConfigFile::new(&no_dlq.toml());
    let run = dlq_cmd(&["inspect", "--config", no_dlq.path()]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("set dlq.topic"), "{run:?}");

    let bad = ConfigFile::new(&cfg.toml().replace("mode = \"single\"", "mode = \"sideways\""));
    for cmd in ["inspect", "replay"] {
        let run = dlq_cmd(&[cmd, "--config", bad.path()]);
        assert_eq!(run.code, Some(2), "an invalid config: {run:?}");
        assert!(run.stderr.contains("app.mode"), "the bad key is named: {run:?}");
    }

    let down = cfg.toml().replace(&brokers(), &format!("127.0.0.1:{}", free_port()));
    let down = ConfigFile::new(&down);
    for cmd in ["inspect", "replay"] {
        let started = Instant::now();
        let run = dlq_cmd(&[cmd, "--config", down.path(), "--timeout", "2s"]);
        assert_eq!(run.code, Some(1), "{cmd}: {run:?}");
        assert!(run.stderr.contains("cannot reach the Kafka brokers"), "{cmd}: {run:?}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{cmd} gave up after its timeout"
        );
    }
}
