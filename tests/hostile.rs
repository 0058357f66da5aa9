//! Hostile records on the real broker: header names and values that are not UTF-8, empty
//! header names, 1,000 headers, a 100 KiB key, a value at the topic's `max.message.bytes`,
//! empty and null values, a null key, and the exact record of issue 8 produced by kcat.
//!
//! Each one is delivered losslessly (the app decodes the key, value and headers back to the
//! exact bytes produced) or dead-lettered with a clear `x-dlq-error-class`; the sidecar keeps
//! running and the committed offsets reach the end, in single and in batch mode.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

/// The topic's `max.message.bytes` (the broker's default, set explicitly so it is known).
const MAX_MESSAGE_BYTES: usize = 1_048_588;
/// Bytes a record batch of one record with a 2-byte key, no headers and a value of about
/// 1 MiB takes beyond its value (batch header 61, record framing 13).
const BATCH_OVERHEAD: usize = 74;

/// One hostile record and whether single mode must dead-letter it.
struct Case {
    name: &'static str,
    record: RawOut,
    /// Single mode cannot carry it within `app.max_header_bytes` (8 KiB by default).
    too_large_for_single_mode: bool,
}

fn case(name: &'static str, key: Option<&[u8]>, value: Option<&[u8]>, headers: Vec<RawHeader>) -> Case {
    Case {
        name,
        record: RawOut {
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            headers,
        },
        too_large_for_single_mode: false,
    }
}

fn h(name: &[u8], value: Option<&[u8]>) -> RawHeader {
    (name.to_vec(), value.map(<[u8]>::to_vec))
}

/// Bytes that are not UTF-8, with every byte value in them.
fn garbage(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 131 + 255) as u8).collect()
}

fn cases() -> Vec<Case> {
    let big_value = vec![b'v'; MAX_MESSAGE_BYTES - BATCH_OVERHEAD];
    let thousand: Vec<RawHeader> = (0..1000)
        .map(|i| (format!("h{i}").into_bytes(), Some(format!("v{i}").into_bytes())))
        .collect();
    vec![
        case(
            "header name not UTF-8",
            Some(b"k0"),
            Some(b"v0"),
            vec![h(b"\xff\xfe", Some(b"v")), h(b"\xc3\x28", Some(b"bad utf-8 pair"))],
        ),
        case(
            "header values not UTF-8, empty and null",
            Some(b"k1"),
            Some(b"v1"),
            vec![h(b"bin", Some(&garbage(64))), h(b"empty", Some(b"")), h(b"null", None)],
        ),
        case(
            "empty header names",
            Some(b"k2"),
            Some(b"v2"),
            vec![h(b"", Some(b"empty name")), h(b"", None)],
        ),
        case(
            "header names with control characters, DEL, quotes and non-ASCII",
            Some(b"k3"),
            Some(b"v3"),
            vec![
                h(b"a\r\nb\x7f\x01\"\\", Some(b"x")),
                h("héader-ключ".as_bytes(), Some("é".as_bytes())),
            ],
        ),
        Case {
            too_large_for_single_mode: true,
            ..case("1,000 headers", Some(b"k4"), Some(b"v4"), thousand)
        },
        Case {
            too_large_for_single_mode: true,
            ..case("a 100 KiB key", Some(&garbage(100 * 1024)), Some(b"v5"), vec![])
        },
        case("a value at max.message.bytes", Some(b"k6"), Some(&big_value), vec![]),
        case("an empty value", Some(b"k7"), Some(b""), vec![]),
        case("a null value", Some(b"k8"), None, vec![h(b"tombstone", Some(b"yes"))]),
        case("a null key", None, Some(b"v9"), vec![]),
        case("a null key and a null value", None, None, vec![]),
        case("an empty key", Some(b""), Some(b"v11"), vec![]),
    ]
}

/// The record of issue 8, produced by kcat exactly as reported: `-H $'\xff\xfe=v'`.
fn kcat_case() -> Case {
    case(
        "kcat -H $'\\xff\\xfe=v'",
        Some(b"kcat-key"),
        Some(b"kcat-value"),
        vec![h(b"\xff\xfe", Some(b"v"))],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_delivered_losslessly_or_dead_lettered_in_single_mode() {
    run("single").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_records_are_delivered_losslessly_or_dead_lettered_in_batch_mode() {
    run("batch").await;
}

async fn run(mode: &'static str) {
    require_kafka();
    let topic = unique(&format!("hostile-{mode}"));
    let dlq = unique(&format!("hostile-{mode}-dlq"));
    let max = MAX_MESSAGE_BYTES.to_string();
    create_topic_with(&topic, 1, &[("max.message.bytes", &max)]).await;
    create_topic(&dlq, 1).await;

    let mut cases = cases();
    let results = produce_raw(&topic, cases.iter().map(|c| c.record.clone()).collect()).await;
    for (c, r) in cases.iter().zip(&results) {
        assert_eq!(r, &Ok(()), "producing {}", c.name);
    }
    // One byte more than the largest value is refused by the broker: the value is at the limit.
    let over = RawOut {
        key: Some(b"k6".to_vec()),
        value: Some(vec![b'v'; MAX_MESSAGE_BYTES - BATCH_OVERHEAD + 1]),
        headers: vec![],
    };
    let refused = produce_raw(&topic, vec![over]).await;
    assert!(
        refused[0].as_ref().is_err_and(|e| e.contains("too large")),
        "the broker accepted a record over max.message.bytes: {refused:?}"
    );
    kcat_produce(&topic, b"\xff\xfe=v", b"kcat-key:kcat-value");
    cases.push(kcat_case());
    assert_eq!(end_offsets(&topic, 1), vec![cases.len() as i64], "one offset per case");

    let app = TestApp::start(|_| Answer::ok()).await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.mode = mode;
    cfg.dlq = Some(dlq.clone());
    let admin = free_port();
    cfg.admin_port = Some(admin);
    cfg.extra = "[batch]\nmax_records = 5\nlinger = \"50ms\"\n".into();
    let mut sidecar = Sidecar::start(&cfg);

    let (committed, ends) = wait_committed_to_end(&cfg.group, &topic, 1, Duration::from_secs(120)).await;
    assert_eq!(committed, ends, "committed offsets never reached the end");
    assert!(
        sidecar.wait_exit(Duration::from_millis(200)).await.is_none(),
        "the sidecar exited"
    );

    let dead_letters = read_all(&dlq, 1);
    let expect_dead: BTreeSet<i64> = cases
        .iter()
        .enumerate()
        .filter(|(_, c)| mode == "single" && c.too_large_for_single_mode)
        .map(|(offset, _)| offset as i64)
        .collect();
    let dead: BTreeSet<i64> = dead_letters
        .iter()
        .map(|d| d.headers["x-dlq-source-offset"].parse().expect("an offset"))
        .collect();
    assert_eq!(dead, expect_dead, "dead-lettered offsets");

    let delivered = app.delivered();
    for (offset, c) in cases.iter().enumerate() {
        let offset = offset as i64;
        if expect_dead.contains(&offset) {
            let d = dead_letters
                .iter()
                .find(|d| d.headers["x-dlq-source-offset"] == offset.to_string())
                .unwrap();
            assert_dead_letter_is_lossless(c, d);
            assert!(
                delivered.iter().all(|r| r.offset != offset),
                "{} was both sent and dead-lettered",
                c.name
            );
            continue;
        }
        let r = delivered
            .iter()
            .find(|r| r.offset == offset)
            .unwrap_or_else(|| panic!("{} (offset {offset}) was not delivered", c.name));
        assert_eq!(r.key, c.record.key, "key of {}", c.name);
        assert_eq!(r.value_null, c.record.value.is_none(), "null value of {}", c.name);
        assert!(
            r.value == c.record.value.clone().unwrap_or_default(),
            "value of {} differs ({} bytes sent, {} produced)",
            c.name,
            r.value.len(),
            c.record.value.as_ref().map_or(0, Vec::len)
        );
        assert!(
            r.record_headers == c.record.headers,
            "headers of {} differ: got {} headers, produced {}",
            c.name,
            r.record_headers.len(),
            c.record.headers.len()
        );
    }

    let (_, metrics) = http_get(&format!("http://127.0.0.1:{admin}/metrics")).await;
    let refused = metric(
        &metrics,
        "kafka_sidecar_records_total",
        &[("outcome", "headers_too_large")],
    );
    assert_eq!(
        refused.unwrap_or(0.0),
        expect_dead.len() as f64,
        "records refused for their header size are counted"
    );
    let log = sidecar.log();
    assert!(!log.contains("panicked"), "the sidecar panicked:\n{log}");
    assert!(
        sidecar.wait_exit(Duration::from_millis(100)).await.is_none(),
        "the sidecar exited"
    );
}

/// The DLQ copy carries the record's key, value and headers byte for byte, then the
/// `x-dlq-*` headers, with error class `headers_too_large`.
fn assert_dead_letter_is_lossless(c: &Case, d: &Read) {
    assert_eq!(d.headers["x-dlq-error-class"], "headers_too_large", "{}", c.name);
    assert!(
        d.headers["x-dlq-error-message"].contains("app.max_header_bytes"),
        "the reason names the setting: {}",
        d.headers["x-dlq-error-message"]
    );
    assert_eq!(d.key, c.record.key, "DLQ key of {}", c.name);
    assert_eq!(d.value, c.record.value, "DLQ value of {}", c.name);
    let n = c.record.headers.len();
    assert!(
        d.raw_headers[..n] == c.record.headers[..],
        "DLQ copy of the headers of {}",
        c.name
    );
    assert!(
        d.raw_headers[n..].iter().all(|(name, _)| name.starts_with(b"x-dlq-")),
        "only x-dlq-* headers are added"
    );
}

/// Without a DLQ a record too large for single mode is not dropped: it holds its own lane
/// (its offset is not committed) while other keys keep flowing, and the sidecar says why once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dlq_a_record_too_large_for_single_mode_holds_only_its_lane() {
    require_kafka();
    let topic = unique("hostile-no-dlq");
    create_topic(&topic, 1).await;
    let mut records = vec![RawOut {
        key: Some(garbage(10 * 1024)),
        value: Some(b"too large".to_vec()),
        headers: vec![],
    }];
    records.extend((1..=5).map(|i| RawOut {
        key: Some(format!("k{i}").into_bytes()),
        value: Some(format!("v{i}").into_bytes()),
        headers: vec![],
    }));
    produce_raw(&topic, records).await;

    let app = TestApp::start(|_| Answer::ok()).await;
    let cfg = SidecarConfig::new(&topic, &app);
    let mut sidecar = Sidecar::start(&cfg);
    assert!(
        wait_until(Duration::from_secs(60), || app.delivered_count() == 5).await,
        "the other keys were not delivered"
    );
    assert!(
        app.delivered().iter().all(|r| r.offset != 0),
        "the large record was sent"
    );
    // Several commit intervals: the offset must stay at the held record.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        committed(&cfg.group, &topic, 1),
        vec![0],
        "the held record was committed past"
    );
    assert!(
        sidecar.wait_exit(Duration::from_millis(100)).await.is_none(),
        "the sidecar exited"
    );
    let log = sidecar.log();
    assert_eq!(
        log.matches("record cannot be sent and no dead-letter topic is configured")
            .count(),
        1,
        "said once why the record is held:\n{log}"
    );
    assert!(log.contains("headers_too_large"), "{log}");
}
