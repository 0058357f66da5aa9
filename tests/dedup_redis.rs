//! Dedup against real Redis: the shared server of the test environment (127.0.0.1:6379,
//! started by `bash scripts/env.sh up`) and `redis-server` instances each test starts for
//! itself (restart, password, TLS, cluster) on free ports in a temp dir.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::redis_server::{TestRedis, ENV_HINT};
use common::{free_port, unique};
use kafka_sidecar::dedup::{Claim, Dedup, DedupConfig, DedupError};
use redis::aio::MultiplexedConnection;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

// ---------------------------------------------------------------------------------------
// Semantics, on the shared Redis
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_done_busy_and_release_across_two_owners() {
    use Claim::*;
    let cfg = shared_cfg();
    let (a, b) = (connect(&cfg, "g").await, connect(&cfg, "g").await);
    assert_eq!(a.backend(), "redis");
    assert_ne!(a.owner(), b.owner());
    let mut raw = raw(SHARED_REDIS).await;

    assert_eq!(a.claim(&keys(&["k1", "k2"])).await.unwrap(), [Claimed, Claimed]);
    assert_eq!(
        b.claim(&keys(&["k1", "k2", "k3"])).await.unwrap(),
        [Busy, Busy, Claimed]
    );
    assert_eq!(
        a.claim(&keys(&["k1"])).await.unwrap(),
        [Claimed],
        "a holds k1 and keeps it"
    );
    assert_eq!(a.storage_key("k1"), format!("{}:g:k1", cfg.prefix));
    assert_eq!(get(&mut raw, &a.storage_key("k1")).await.as_deref(), Some(a.owner()));

    a.mark_done(&keys(&["k1"])).await.unwrap();
    assert_eq!(get(&mut raw, &a.storage_key("k1")).await.as_deref(), Some("done"));
    let ttl = pttl(&mut raw, &a.storage_key("k1")).await;
    assert!(ttl > cfg.done_ttl.as_millis() as i64 - 5_000, "done ttl {ttl}ms");
    assert_eq!(b.claim(&keys(&["k1"])).await.unwrap(), [Done]);
    assert_eq!(a.claim(&keys(&["k1"])).await.unwrap(), [Done]);

    b.release(&keys(&["k2", "k1"])).await.unwrap();
    assert_eq!(
        get(&mut raw, &a.storage_key("k2")).await.as_deref(),
        Some(a.owner()),
        "b cannot release a's lease"
    );
    assert_eq!(
        get(&mut raw, &a.storage_key("k1")).await.as_deref(),
        Some("done"),
        "release never undoes done"
    );
    assert_eq!(b.claim(&keys(&["k2"])).await.unwrap(), [Busy]);
    a.release(&keys(&["k2"])).await.unwrap();
    assert_eq!(get(&mut raw, &a.storage_key("k2")).await, None);
    assert_eq!(b.claim(&keys(&["k2"])).await.unwrap(), [Claimed]);

    let other_group = connect(&cfg, "other-group").await;
    assert_eq!(
        other_group.claim(&keys(&["k1"])).await.unwrap(),
        [Claimed],
        "groups do not share keys"
    );
    assert_eq!(
        a.claim(&keys(&["k4", "k4"])).await.unwrap(),
        [Claimed, Busy],
        "a repeated key is claimed once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_lets_another_owner_claim_and_claiming_again_refreshes_it() {
    use Claim::*;
    let cfg = DedupConfig {
        lease_ttl: Duration::from_secs(2),
        ..shared_cfg()
    };
    let (a, b) = (connect(&cfg, "g").await, connect(&cfg, "g").await);
    let mut raw = raw(SHARED_REDIS).await;
    let k = keys(&["k"]);

    assert_eq!(a.claim(&k).await.unwrap(), [Claimed]);
    let ttl = pttl(&mut raw, &a.storage_key("k")).await;
    assert!(ttl > 0 && ttl <= 2_000, "lease ttl {ttl}ms");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(a.claim(&k).await.unwrap(), [Claimed], "a retry keeps its lease");
    assert!(
        pttl(&mut raw, &a.storage_key("k")).await > 1_200,
        "the lease was refreshed"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(
        b.claim(&k).await.unwrap(),
        [Busy],
        "2.4s after the first claim, the refreshed lease holds"
    );
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(
        b.claim(&k).await.unwrap(),
        [Claimed],
        "the lease expired: another owner takes over"
    );

    a.release(&k).await.unwrap();
    assert_eq!(
        get(&mut raw, &a.storage_key("k")).await.as_deref(),
        Some(b.owner()),
        "a lost its lease and cannot delete b's"
    );
    assert_eq!(a.claim(&k).await.unwrap(), [Busy]);
}

// ---------------------------------------------------------------------------------------
// One round trip per batch, on a test-owned server (no other client disturbs its counters)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_costs_one_round_trip_whatever_its_size() {
    let server = TestRedis::start(&[]);
    let d = connect(&test_cfg(&server.url()), "g").await;
    let mut raw = raw(&server.url()).await;
    let batch: Vec<String> = (0..50).map(|i| format!("key-{i}")).collect();
    warm_up_scripts(&d).await;

    let before = stats(&mut raw).await;
    assert!(d.claim(&batch).await.unwrap().iter().all(|c| *c == Claim::Claimed));
    let after_claim = stats(&mut raw).await;
    d.mark_done(&batch[..25]).await.unwrap();
    let after_done = stats(&mut raw).await;
    d.release(&batch[25..]).await.unwrap();
    let after_release = stats(&mut raw).await;

    // New keys are claimed with one plain SET NX each and no script; done is a SET per key;
    // release is one script call for the batch...
    assert_eq!(after_claim.evalsha - before.evalsha, 0);
    assert_eq!(after_claim.set - before.set, 50);
    assert_eq!(after_done.evalsha - after_claim.evalsha, 0);
    assert_eq!(after_done.set - after_claim.set, 25);
    assert_eq!(after_release.evalsha - after_done.evalsha, 1);
    assert_eq!(after_release.del - after_done.del, 25, "our 25 leases deleted");
    assert_eq!(after_release.set, after_done.set);
    // ...and the server read each batch in one go: the read count grows by the batch (one
    // read; two if TCP splits the pipeline) plus the INFO that measures it, never per key.
    for (what, reads) in [
        ("claim", after_claim.reads - before.reads),
        ("mark_done", after_done.reads - after_claim.reads),
        ("release", after_release.reads - after_done.reads),
    ] {
        assert!((2..=3).contains(&reads), "{what}: {reads} socket reads for a batch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_one_script_call_is_split_and_keeps_every_key_in_order() {
    use Claim::*;
    let server = TestRedis::start(&[]);
    let (_, a, b, mut raw) = two_owners(&server).await;
    let batch: Vec<String> = (0..1201).map(|i| format!("key-{i}")).collect();
    // Every key exists, so each goes on to the claim script: every 7th is done, every 11th
    // (not 7th) held by b, the rest held by a. The replies must land on their keys across
    // the three script calls.
    let done: Vec<String> = batch.iter().step_by(7).cloned().collect();
    let held: Vec<String> = (0..1201)
        .filter(|i| i % 11 == 0 && i % 7 != 0)
        .map(|i| batch[i].clone())
        .collect();
    a.mark_done(&done).await.unwrap();
    assert!(b.claim(&held).await.unwrap().iter().all(|c| *c == Claimed));
    let first = a.claim(&batch).await.unwrap();
    assert_eq!(
        first.iter().filter(|c| **c == Claimed).count(),
        1201 - done.len() - held.len()
    );

    let before = stats(&mut raw).await;
    let claims = a.claim(&batch).await.unwrap();
    let after = stats(&mut raw).await;
    assert_eq!(after.evalsha - before.evalsha, 3, "1201 keys = 500 + 500 + 201");
    let expected: Vec<Claim> = (0..1201)
        .map(|i| match (i % 7 == 0, i % 11 == 0) {
            (true, _) => Done,
            (false, true) => Busy,
            (false, false) => Claimed,
        })
        .collect();
    assert_eq!(claims, expected);
    for i in [1, 499, 500, 501, 999, 1000, 1200] {
        let owner = get(&mut raw, &a.storage_key(&batch[i])).await;
        assert_eq!(owner.as_deref(), Some(a.owner()), "key {i}");
    }
    a.mark_done(&batch).await.unwrap();
    assert_eq!(b.claim(&batch).await.unwrap(), vec![Done; 1201]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_new_key_costs_plain_commands_and_only_an_existing_key_runs_the_script() {
    use Claim::*;
    let server = TestRedis::start(&[]);
    let (cfg, a, b, mut raw) = two_owners(&server).await;
    let k = keys(&["only"]);
    warm_up_scripts(&a).await;

    let s0 = stats(&mut raw).await;
    assert_eq!(a.claim(&k).await.unwrap(), [Claimed]);
    let s1 = stats(&mut raw).await;
    assert_eq!(
        (s1.set - s0.set, s1.evalsha - s0.evalsha),
        (1, 0),
        "a new key: one SET NX"
    );
    assert_eq!(get(&mut raw, &a.storage_key("only")).await.as_deref(), Some(a.owner()));
    let ttl = pttl(&mut raw, &a.storage_key("only")).await;
    assert!(ttl > 0 && ttl <= cfg.lease_ttl.as_millis() as i64, "lease ttl {ttl}ms");

    // The key exists: SET NX fails and the script decides (ours → refreshed; b → busy).
    assert_eq!(a.claim(&k).await.unwrap(), [Claimed]);
    assert_eq!(b.claim(&k).await.unwrap(), [Busy]);
    let s2 = stats(&mut raw).await;
    assert_eq!(s2.evalsha - s1.evalsha, 2);
    assert_eq!(get(&mut raw, &a.storage_key("only")).await.as_deref(), Some(a.owner()));

    a.mark_done(&k).await.unwrap();
    let s3 = stats(&mut raw).await;
    assert_eq!((s3.set - s2.set, s3.evalsha - s2.evalsha), (1, 0), "done: one SET");
    assert_eq!(get(&mut raw, &a.storage_key("only")).await.as_deref(), Some("done"));
    assert_eq!(b.claim(&k).await.unwrap(), [Done]);
    assert_eq!(a.claim(&k).await.unwrap(), [Done]);

    let other = keys(&["other"]);
    assert_eq!(b.claim(&other).await.unwrap(), [Claimed]);
    a.release(&other).await.unwrap();
    assert_eq!(get(&mut raw, &a.storage_key("other")).await.as_deref(), Some(b.owner()));
    b.release(&other).await.unwrap();
    assert_eq!(get(&mut raw, &a.storage_key("other")).await, None);
}

// ---------------------------------------------------------------------------------------
// Failures and reconnection
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_fails_fast_with_a_clear_error() {
    let port = free_port();
    let cfg = test_cfg(&format!("redis://127.0.0.1:{port}"));
    let started = Instant::now();
    let err = Dedup::connect(&cfg, "g").await.unwrap_err();
    assert_unavailable(&err);
    let lazy = Dedup::connect_lazy(&cfg, "g").await.expect("lazy connect does no I/O");
    assert_unavailable(&lazy.claim(&keys(&["k"])).await.unwrap_err());
    assert_unavailable(&lazy.mark_done(&keys(&["k"])).await.unwrap_err());
    assert_unavailable(&lazy.release(&keys(&["k"])).await.unwrap_err());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_reconnects_on_its_own_after_redis_restarts() {
    use Claim::*;
    let mut server = TestRedis::start(&[]);
    let d = connect(&test_cfg(&server.url()), "g").await;
    assert_eq!(d.claim(&keys(&["before"])).await.unwrap(), [Claimed]);

    server.shutdown_nosave();
    let started = Instant::now();
    assert_unavailable(&d.claim(&keys(&["k"])).await.unwrap_err());
    assert_unavailable(&d.mark_done(&keys(&["k"])).await.unwrap_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "errors took {:?}",
        started.elapsed()
    );

    server.restart();
    // The same store, not a new one: its connection comes back by itself.
    let both = keys(&["k", "before"]);
    let claims = retry_until_ok(Duration::from_secs(15), || d.claim(&both)).await;
    assert_eq!(
        claims,
        [Claimed, Claimed],
        "the restarted server lost its keys (nosave)"
    );
    d.mark_done(&keys(&["k"])).await.unwrap();
    assert_eq!(
        d.claim(&keys(&["k"])).await.unwrap(),
        [Done],
        "scripts were loaded again"
    );

    // A restart between two batches is not even seen: the dropped connection is replaced
    // and the batch retried once inside the same call.
    server.shutdown_nosave();
    server.restart();
    assert_eq!(
        d.claim(&keys(&["k"])).await.unwrap(),
        [Claimed],
        "no error, keys forgotten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_redis_takes_the_password_from_the_url() {
    let password = "s3cret-pw";
    let server = TestRedis::start(&["--requirepass", password]);
    let port = server.port;

    let d = connect(&test_cfg(&format!("redis://:{password}@127.0.0.1:{port}/0")), "g").await;
    assert_eq!(d.claim(&keys(&["k"])).await.unwrap(), [Claim::Claimed]);
    d.mark_done(&keys(&["k"])).await.unwrap();
    assert_eq!(d.claim(&keys(&["k"])).await.unwrap(), [Claim::Done]);
    assert!(!d.target().contains(password), "{}", d.target());
    assert!(!format!("{d:?}").contains(password));

    for url in [
        format!("redis://:wrong-pw@127.0.0.1:{port}/0"),
        format!("redis://127.0.0.1:{port}/0"),
    ] {
        let err = Dedup::connect(&test_cfg(&url), "g").await.unwrap_err();
        assert_unavailable(&err);
        assert!(!err.to_string().contains("wrong-pw"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_verifies_the_server() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    self_signed_cert(&cert, &key);
    let server = TestRedis::start_tls(&cert, &key);
    let url = format!("rediss://127.0.0.1:{}/0", server.port);

    let cfg = DedupConfig {
        tls_ca_file: cert.display().to_string(),
        ..test_cfg(&url)
    };
    let d = connect(&cfg, "g").await;
    assert_eq!(d.claim(&keys(&["k"])).await.unwrap(), [Claim::Claimed]);
    d.mark_done(&keys(&["k"])).await.unwrap();
    assert_eq!(d.claim(&keys(&["k"])).await.unwrap(), [Claim::Done]);

    let untrusted = Dedup::connect(&test_cfg(&url), "g").await.unwrap_err();
    assert_unavailable(&untrusted);
    let plaintext = format!("redis://127.0.0.1:{}/0", server.port);
    assert_unavailable(&Dedup::connect(&test_cfg(&plaintext), "g").await.unwrap_err());
}

// ---------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_batch_spans_slots_and_nodes_and_survives_a_node_restart() {
    use Claim::*;
    let mut cluster = TestCluster::start();
    let cfg = DedupConfig {
        redis_url: String::new(),
        cluster_urls: cluster.urls(),
        ..test_cfg("")
    };
    let (a, b) = (connect(&cfg, "g").await, connect(&cfg, "g").await);
    assert_eq!(a.backend(), "redis-cluster");
    let batch: Vec<String> = (0..30).map(|i| format!("order-{i}")).collect();

    assert_eq!(a.claim(&batch).await.unwrap(), vec![Claimed; 30]);
    let mut per_node = Vec::new();
    for url in cluster.urls() {
        per_node.push(dbsize(&mut raw(&url).await).await);
    }
    assert_eq!(per_node.iter().sum::<i64>(), 30, "{per_node:?}");
    assert!(
        per_node.iter().all(|n| *n > 0),
        "one batch reached every node: {per_node:?}"
    );

    // Redis Cluster takes no pipeline and no script across slots: the batch goes out per
    // slot, concurrently (SET NX per key, then, as every key is a's, one claim script call
    // per slot), and the nodes read them in far fewer socket reads than keys (the node
    // connections coalesce concurrent requests).
    let slots: std::collections::HashSet<_> = batch
        .iter()
        .map(|k| redis::cluster_routing::Slot::for_key(a.storage_key(k)))
        .collect();
    let mut node_conns = Vec::new();
    for url in cluster.urls() {
        node_conns.push(raw(&url).await);
    }
    // Warm-up: the nodes do not know the claim script yet (NOSCRIPT, load, retry).
    assert_eq!(b.claim(&batch).await.unwrap(), vec![Busy; 30]);
    let mut before = Vec::new();
    for conn in &mut node_conns {
        before.push(stats(conn).await);
    }
    assert_eq!(b.claim(&batch).await.unwrap(), vec![Busy; 30]);
    let (mut commands, mut reads) = (0, 0);
    for (conn, before) in node_conns.iter_mut().zip(&before) {
        let after = stats(conn).await;
        commands += after.evalsha - before.evalsha;
        reads += after.reads - before.reads - 1; // minus the INFO that measures it
    }
    assert_eq!(commands, slots.len() as i64, "one script call per slot");
    assert!(
        reads < 30,
        "{reads} socket reads for 2 requests per slot of a batch of 30 keys on 3 nodes"
    );
    a.mark_done(&batch[..10]).await.unwrap();
    a.release(&batch[10..]).await.unwrap();
    let after = b.claim(&batch).await.unwrap();
    assert_eq!(after[..10], vec![Done; 10]);
    assert_eq!(after[10..], vec![Claimed; 20]);

    // Which keys live on the node about to restart (a plain connection to a node answers
    // MOVED for keys of other nodes' slots).
    let mut restarting = raw(&cluster.nodes[1].url()).await;
    let mut on_restarted_node = Vec::new();
    for k in &batch {
        let exists = redis::cmd("EXISTS")
            .arg(a.storage_key(k))
            .query_async::<i64>(&mut restarting)
            .await;
        on_restarted_node.push(matches!(exists, Ok(1)));
    }
    assert!(on_restarted_node.contains(&true));

    cluster.nodes[1].shutdown_nosave();
    let started = Instant::now();
    assert_unavailable(&a.claim(&batch).await.unwrap_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    cluster.nodes[1].restart();
    cluster.wait_ok();
    // The same store: it reconnects to the restarted node by itself. That node forgot its
    // keys (nosave); the others still hold done marks (first 10) and b's leases (the rest).
    let claims = retry_until_ok(Duration::from_secs(30), || a.claim(&batch)).await;
    let expected: Vec<Claim> = (0..30)
        .map(|i| match (on_restarted_node[i], i < 10) {
            (true, _) => Claimed,
            (false, true) => Done,
            (false, false) => Busy,
        })
        .collect();
    assert_eq!(claims, expected);
    // The cluster may still be settling after the restart (slot ownership, node connections
    // re-established under load): an operation that times out is retried, as the gate does.
    retry_until_ok(Duration::from_secs(30), || a.mark_done(&batch)).await;
    assert_eq!(
        retry_until_ok(Duration::from_secs(30), || b.claim(&batch)).await,
        vec![Done; 30]
    );
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn keys(ks: &[&str]) -> Vec<String> {
    ks.iter().map(|k| k.to_string()).collect()
}

/// A config for a test-owned server: short timeout, short-lived keys, a unique prefix.
fn test_cfg(url: &str) -> DedupConfig {
    DedupConfig {
        enabled: true,
        redis_url: url.into(),
        done_ttl: Duration::from_secs(120),
        timeout: Duration::from_secs(1),
        prefix: unique("dedup-test"),
        ..DedupConfig::default()
    }
}

/// The shared Redis; fails the test (never skips it) when it is not there.
fn shared_cfg() -> DedupConfig {
    let client = redis::Client::open(SHARED_REDIS).unwrap();
    let ping = client
        .get_connection_with_timeout(Duration::from_secs(3))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
    if let Err(e) = ping {
        panic!("Redis is not reachable at 127.0.0.1:6379 ({e}): {ENV_HINT}");
    }
    test_cfg(SHARED_REDIS)
}

/// Two owners of one namespace on `server`, their config, and a plain connection to it.
async fn two_owners(server: &TestRedis) -> (DedupConfig, Dedup, Dedup, MultiplexedConnection) {
    let cfg = test_cfg(&server.url());
    let (a, b) = (connect(&cfg, "g").await, connect(&cfg, "g").await);
    (cfg, a, b, raw(&server.url()).await)
}

/// A fresh server does not know the scripts yet (NOSCRIPT, load, retry): a release runs one,
/// and its NOSCRIPT answer loads them all, so that counting commands afterwards sees no retry.
async fn warm_up_scripts(d: &Dedup) {
    let warm = keys(&["warm-1", "warm-2"]);
    d.claim(&warm).await.unwrap();
    d.release(&warm).await.unwrap();
}

async fn connect(cfg: &DedupConfig, group: &str) -> Dedup {
    match Dedup::connect(cfg, group).await {
        Ok(d) => d,
        Err(e) => panic!("cannot connect to {}: {e} ({ENV_HINT})", cfg.redacted().redis_url),
    }
}

fn assert_unavailable(err: &DedupError) {
    assert!(err.to_string().starts_with("redis unavailable: "), "{err}");
}

async fn retry_until_ok<T, F: std::future::Future<Output = Result<T, DedupError>>>(
    within: Duration,
    mut op: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("still failing after {within:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn raw(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e} ({ENV_HINT})"))
}

async fn get(raw: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET").arg(key).query_async(raw).await.unwrap()
}

async fn pttl(raw: &mut MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(raw).await.unwrap()
}

async fn dbsize(raw: &mut MultiplexedConnection) -> i64 {
    redis::cmd("DBSIZE").query_async(raw).await.unwrap()
}

/// Server counters: socket reads, and calls of EVALSHA, SET and DEL (also those that
/// scripts make).
#[derive(Debug, Clone, Copy)]
struct Stats {
    reads: i64,
    evalsha: i64,
    set: i64,
    del: i64,
}

async fn stats(raw: &mut MultiplexedConnection) -> Stats {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .arg("commandstats")
        .query_async(raw)
        .await
        .unwrap();
    let field = |prefix: &str| -> i64 {
        info.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().unwrap()
            })
            .unwrap_or(0)
    };
    Stats {
        reads: field("total_reads_processed:"),
        evalsha: field("cmdstat_evalsha:calls="),
        set: field("cmdstat_set:calls="),
        del: field("cmdstat_del:calls="),
    }
}

fn self_signed_cert(cert: &Path, key: &Path) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(key)
        .arg("-out")
        .arg(cert)
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}): {ENV_HINT}"));
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three test-owned masters, no replicas, all 16384 slots assigned.
struct TestCluster {
    nodes: Vec<TestRedis>,
}

impl TestCluster {
    fn start() -> TestCluster {
        let nodes: Vec<TestRedis> = (0..3)
            .map(|_| {
                TestRedis::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): {ENV_HINT}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = TestCluster { nodes };
        cluster.wait_ok();
        cluster
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(TestRedis::url).collect()
    }

    /// Until every node reports `cluster_state:ok`.
    fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.nodes {
            loop {
                let out = Command::new("redis-cli")
                    .args(["-h", "127.0.0.1", "-p", &node.port.to_string(), "cluster", "info"])
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster on port {} never became ok",
                    node.port
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}
