//! Dedup: a record whose idempotency key is already done is not delivered again.
//!
//! Two phases, so that a crash mid-delivery never turns into a silent drop. Before a record
//! is delivered its key is *claimed*: a short lease (`lease_ttl`) saying "this consumer is
//! delivering it". After the app accepted the record the key is *marked done* for
//! `done_ttl`; when delivery fails the claim is *released*. A consumer that dies between
//! claim and done leaves only the lease, which expires, and the record is delivered again by
//! whoever reads it next: at worst a duplicate, never a loss. A key held by another
//! consumer's live lease is [`Claim::Busy`]: the caller retries it later and never skips it.
//!
//! Keys live in Redis (standalone, with a password and/or TLS, or Redis Cluster) as
//! `{prefix}:{group}:{idempotency key}`, holding `"done"` or the owner token of the process
//! whose lease it is. Without Redis an embedded store keeps them in this process only,
//! bounded and with the same TTLs: enough for a developer running one sidecar, no
//! protection across replicas.
//!
//! Every operation takes a whole batch and costs one round trip, its commands pipelined, and
//! the common case costs Redis the least work: claiming is one plain `SET key owner NX PX
//! lease` per key (in a live stream almost every key is new, and a plain command costs Redis
//! about a third less CPU than the same command made from a Lua script); only the keys that
//! already exist (done, our lease on a retry, another consumer's lease) go on to the claim
//! script, in a second round trip, one call per [`KEYS_PER_SCRIPT`] keys. Done is a plain
//! `SET` per key, release (compare-and-delete) one script call per [`KEYS_PER_SCRIPT`] keys.
//! In cluster mode the batch is split by hash slot (a pipeline or a script's keys must
//! share one) and the per-slot calls are sent concurrently, so the batch still costs one
//! round trip of latency. Concurrent callers' `SET NX` claims and done marks share a pipeline
//! ([`combine`]): one such call is in flight at a time, and the calls that arrive meanwhile
//! go together as soon as it is answered. Redis errors never panic: they come
//! back as [`DedupError`] ("redis unavailable: ..."), within `timeout` of the call that
//! carries them (a caller queued behind a call in flight waits for that one first), and the connections
//! reconnect on their own (a dropped connection is retried once on a fresh one inside the
//! same operation). Callers time the operations themselves for latency metrics: each one is
//! a single awaited call.

mod combine;
mod gate;
mod key;
mod memory;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{ErrorKind, Pipeline, RedisError, RedisResult, Script, ServerErrorKind, Value};
use tokio::time::Instant;

use self::combine::Combiner;
pub use self::gate::{Decision, Gate};
pub use self::key::{derive_key, idempotency_key, DerivedKey};
use self::memory::MemoryStore;
use crate::config::redact_url;
pub use crate::config::{DedupConfig, KeySource, OnError};
use crate::record::Record;

/// The value of a key whose record was delivered. Owner tokens never equal it.
const DONE: &str = "done";

/// Keys per script call. A script runs atomically, blocking every other client of the
/// server while it does: 500 keys take well under a millisecond.
const KEYS_PER_SCRIPT: usize = 500;

/// Most keys in one combined `SET NX` or done pipeline (see [`combine`]).
const COMBINED_KEYS: usize = 1000;

/// Claim each of KEYS for owner ARGV[1] with a PX ARGV[2] lease ('done' is ARGV[3]), one
/// reply per key: absent → taken → 1; done → 0; already ours → lease refreshed → 1; another
/// owner's live lease → 2. Called for keys that existed a moment ago; one may have expired
/// since, hence `SET NX` first.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local owner, lease, done = ARGV[1], ARGV[2], ARGV[3]
local r = {}
for i, k in ipairs(KEYS) do
  if redis.call('SET', k, owner, 'NX', 'PX', lease) then
    r[i] = 1
  else
    local v = redis.call('GET', k)
    if v == done then
      r[i] = 0
    elseif v == owner then
      redis.call('PEXPIRE', k, lease)
      r[i] = 1
    else
      r[i] = 2
    end
  end
end
return r",
    )
});

/// Delete each of KEYS only while it still holds our lease (ARGV[1]); per key 1 if deleted.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local r = {}
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    r[i] = redis.call('DEL', k)
  else
    r[i] = 0
  end
end
return r",
    )
});

/// The state of one key after [`Dedup::claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The lease is ours (new, or refreshed because we already held it): deliver.
    Claimed,
    /// Already delivered: finish the record without delivering it.
    Done,
    /// Another consumer's live lease: retry later, never skip.
    Busy,
}

/// A dedup store operation failed. Every variant but `Config` means Redis could not be used
/// for this batch; `dedup.on_error` decides what happens to the records.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DedupError {
    /// Redis refused, dropped the connection, or answered with an error.
    #[error("redis unavailable: {0}")]
    Unavailable(RedisError),
    /// No answer within `dedup.timeout`.
    #[error("redis unavailable: no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// An answer the dedup commands never give (a wrong number or kind of replies).
    #[error("redis unavailable: unexpected reply {0}")]
    UnexpectedReply(String),
    /// The configuration cannot be used (e.g. an unreadable CA file, a bad URL).
    #[error("invalid dedup configuration: {0}")]
    Config(String),
}

/// The dedup store: Redis, Redis Cluster, or in memory, with this process's owner token.
///
/// Cheap to share behind an `Arc`; all operations take `&self`.
pub struct Dedup {
    store: Store,
    source: KeySource,
    /// `{prefix}:{group}:`
    namespace: String,
    owner: String,
    lease_ttl: Duration,
    done_ttl: Duration,
    timeout: Duration,
    /// The store's address with passwords redacted, for logs.
    target: String,
    /// Concurrent `SET NX` claims and done marks, each combined into one pipeline.
    claims: Combiner,
    dones: Combiner,
}

enum Store {
    Memory(Mutex<MemoryStore>),
    Remote(Remote),
}

enum Remote {
    Redis(ConnectionManager),
    Cluster(Box<ClusterHandle>),
}

/// A Redis Cluster connection that is replaced by a fresh one after a failure.
///
/// redis-rs's async cluster connection reconnects to a restarted node by itself most of the
/// time, but not always: after a node restart under load it was seen answering nothing but
/// timeouts for more than 30 s. A fresh connection starts from the configured nodes and
/// reads the topology again, so after a failed call the next one gets a new connection — at
/// most once per `dedup.timeout` (at least 1 s), so that an outage causes no reconnect storm.
struct ClusterHandle {
    client: ClusterClient,
    config: ClusterConfig,
    renew_after: Duration,
    current: Mutex<(ClusterConnection, Instant)>,
}

impl ClusterHandle {
    fn new(client: ClusterClient, config: ClusterConfig, timeout: Duration) -> ClusterHandle {
        let conn = client.get_pending_async_connection_with_config(config.clone());
        ClusterHandle {
            client,
            config,
            renew_after: timeout.max(Duration::from_secs(1)),
            current: Mutex::new((conn, Instant::now())),
        }
    }

    /// The current connection (a cheap handle onto its driver task).
    fn get(&self) -> ClusterConnection {
        self.current.lock().unwrap_or_else(PoisonError::into_inner).0.clone()
    }

    /// After a failed call: replaces the connection unless it is younger than `renew_after`.
    /// Calls in flight on the old one finish on it.
    fn renew(&self) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.1.elapsed() >= self.renew_after {
            let conn = self
                .client
                .get_pending_async_connection_with_config(self.config.clone());
            *current = (conn, Instant::now());
            tracing::info!("redis cluster call failed: reconnecting from the configured nodes");
        }
    }

    /// `result`, renewing the connection first when it is an error.
    fn observe<T>(&self, result: Result<T, DedupError>) -> Result<T, DedupError> {
        if result.is_err() {
            self.renew();
        }
        result
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `SET key owner NX PX lease` per key: `OK` (claimed) or nil (the key exists).
    ClaimNew,
    /// The claim script, for keys that exist.
    Claim,
    /// `SET key done PX ttl` per key: `OK`.
    Done,
    /// The release script.
    Release,
}

impl Dedup {
    /// Builds the store for consumer group `group` and checks that Redis answers (`PING`),
    /// so that a wrong address, password or certificate shows up at start-up. Must run
    /// inside a Tokio runtime. Does not look at `cfg.enabled`: the caller decides.
    pub async fn connect(cfg: &DedupConfig, group: &str) -> Result<Dedup, DedupError> {
        let dedup = Self::connect_lazy(cfg, group).await?;
        dedup.ping().await?;
        Ok(dedup)
    }

    /// Like [`Dedup::connect`] without the `PING`: the first operation connects, so this
    /// succeeds while Redis is down (operations fail until it is back).
    pub async fn connect_lazy(cfg: &DedupConfig, group: &str) -> Result<Dedup, DedupError> {
        let (store, target) = if !cfg.cluster_urls.is_empty() {
            let urls: Vec<String> = cfg.cluster_urls.iter().map(|u| redact_url(u)).collect();
            (cluster_store(cfg)?, format!("redis cluster {}", urls.join(",")))
        } else if !cfg.redis_url.is_empty() {
            (redis_store(cfg)?, format!("redis {}", redact_url(&cfg.redis_url)))
        } else {
            let memory = MemoryStore::new(cfg.memory_max_entries);
            (
                Store::Memory(Mutex::new(memory)),
                "in-memory (this process only)".into(),
            )
        };
        let dedup = Dedup {
            store,
            source: cfg.key_source(),
            namespace: format!("{}:{group}:", cfg.prefix),
            owner: owner_token(),
            lease_ttl: cfg.lease_ttl,
            done_ttl: cfg.done_ttl,
            timeout: cfg.timeout,
            target,
            claims: Combiner::new(COMBINED_KEYS),
            dones: Combiner::new(COMBINED_KEYS),
        };
        tracing::info!(
            store = %dedup.target,
            namespace = %dedup.namespace,
            owner = %dedup.owner,
            "dedup store configured"
        );
        Ok(dedup)
    }

    /// Checks that the store answers (every primary, in cluster mode).
    pub async fn ping(&self) -> Result<(), DedupError> {
        let ping = redis::cmd("PING");
        match &self.store {
            Store::Memory(_) => Ok(()),
            Store::Remote(Remote::Redis(conn)) => self.bounded(ping.exec_async(&mut conn.clone())).await,
            Store::Remote(Remote::Cluster(cluster)) => {
                cluster.observe(self.bounded(ping.exec_async(&mut cluster.get())).await)
            }
        }
    }

    /// The idempotency key of `record` under the configured `dedup.key`.
    pub fn derive_key(&self, record: &Record) -> DerivedKey {
        derive_key(&self.source, record)
    }

    /// The key that stores `idempotency_key`: `{prefix}:{group}:{idempotency_key}`.
    pub fn storage_key(&self, idempotency_key: &str) -> String {
        let mut key = String::with_capacity(self.namespace.len() + idempotency_key.len());
        key.push_str(&self.namespace);
        key.push_str(idempotency_key);
        key
    }

    /// This process's owner token: the value of the keys it holds a lease on.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// "redis", "redis-cluster" or "memory" (a bounded metrics label).
    pub fn backend(&self) -> &'static str {
        match self.store {
            Store::Memory(_) => "memory",
            Store::Remote(Remote::Redis(_)) => "redis",
            Store::Remote(Remote::Cluster(_)) => "redis-cluster",
        }
    }

    /// Where the keys live, passwords redacted (for logs).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Claims `keys` (idempotency keys) before delivery, atomically per key: done →
    /// [`Claim::Done`]; free → our lease for `lease_ttl` → [`Claim::Claimed`]; already our
    /// lease → refreshed → [`Claim::Claimed`] (a record being retried keeps its lease);
    /// another owner's lease → [`Claim::Busy`]. A key repeated within `keys` is claimed once:
    /// its later copies are `Busy` (or `Done`), so two records sharing a key in one batch are
    /// never both delivered. One round trip for the batch, two if some keys already exist.
    ///
    /// The lease belongs to the process, not to the record: two *different* records with the
    /// same key claimed in separate calls while both are in flight in this process both get
    /// `Claimed`. Records sharing a key must be delivered one after another (as a lane), or
    /// claimed in the same batch.
    ///
    /// On error some keys may already hold our lease; claiming them again is safe, and
    /// otherwise the lease expires after `lease_ttl`.
    pub async fn claim(&self, keys: &[String]) -> Result<Vec<Claim>, DedupError> {
        let (unique, first) = first_occurrences(keys);
        let claims: Vec<Claim> = match &self.store {
            Store::Memory(memory) => {
                let mut memory = memory.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                unique
                    .iter()
                    .map(|k| memory.claim(&self.storage_key(k), &self.owner, self.lease_ttl, now))
                    .collect()
            }
            Store::Remote(remote) => self.remote_claim(remote, &unique).await?,
        };
        Ok(first
            .iter()
            .map(|&(u, is_first)| match claims[u] {
                claim if is_first => claim,
                Claim::Done => Claim::Done,
                Claim::Claimed | Claim::Busy => Claim::Busy,
            })
            .collect())
    }

    /// `SET NX` takes the keys that are new; the claim script decides for the others.
    async fn remote_claim(&self, remote: &Remote, keys: &[&str]) -> Result<Vec<Claim>, DedupError> {
        let mut claims = vec![Claim::Claimed; keys.len()];
        let mut existing = Vec::new();
        for (i, reply) in self.remote_batch(remote, Op::ClaimNew, keys).await?.iter().enumerate() {
            if *reply == Value::Nil {
                existing.push(i);
            }
        }
        if existing.is_empty() {
            return Ok(claims);
        }
        let existing_keys: Vec<&str> = existing.iter().map(|&i| keys[i]).collect();
        let replies = self.remote_batch(remote, Op::Claim, &existing_keys).await?;
        for (&i, reply) in existing.iter().zip(replies) {
            claims[i] = claim_reply(reply)?;
        }
        Ok(claims)
    }

    /// Marks `keys` done for `done_ttl` after their records were delivered (whoever holds
    /// them). One round trip for the batch.
    pub async fn mark_done(&self, keys: &[String]) -> Result<(), DedupError> {
        match &self.store {
            Store::Memory(memory) => {
                let mut memory = memory.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                for k in keys {
                    memory.mark_done(&self.storage_key(k), self.done_ttl, now);
                }
                Ok(())
            }
            Store::Remote(remote) => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                self.remote_batch(remote, Op::Done, &keys).await.map(drop)
            }
        }
    }

    /// Releases our lease on `keys` after a failed delivery, so that the record can be
    /// claimed again at once. A key that is done or held by another owner is left alone
    /// (compare-and-delete). One round trip for the batch.
    pub async fn release(&self, keys: &[String]) -> Result<(), DedupError> {
        match &self.store {
            Store::Memory(memory) => {
                let mut memory = memory.lock().unwrap_or_else(PoisonError::into_inner);
                let now = Instant::now();
                for k in keys {
                    memory.release(&self.storage_key(k), &self.owner, now);
                }
                Ok(())
            }
            Store::Remote(remote) => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                self.remote_batch(remote, Op::Release, &keys).await.map(drop)
            }
        }
    }

    /// Runs `op` on `keys` in Redis, one reply per key, in order. Plain claims and done marks
    /// of concurrent callers (single mode's workers) share a pipeline: see [`combine`].
    async fn remote_batch(&self, remote: &Remote, op: Op, keys: &[&str]) -> Result<Vec<Value>, DedupError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let combiner = match op {
            Op::ClaimNew => &self.claims,
            Op::Done => &self.dones,
            Op::Claim | Op::Release => return self.send_batch(remote, op, keys).await,
        };
        combiner
            .call(keys, |all| async move {
                let all: Vec<&str> = all.iter().map(String::as_str).collect();
                self.send_batch(remote, op, &all).await
            })
            .await
    }

    /// Sends `op` on `keys` to Redis now, one reply per key, in order.
    async fn send_batch(&self, remote: &Remote, op: Op, keys: &[&str]) -> Result<Vec<Value>, DedupError> {
        match remote {
            Remote::Redis(conn) => {
                let pipe = self.pipeline(op, keys);
                per_key(op, keys.len(), self.bounded(query(conn, &pipe)).await?)
            }
            Remote::Cluster(cluster) => {
                let conn = cluster.get();
                let groups = cluster.observe(self.bounded(self.cluster_batch(&conn, op, keys)).await)?;
                let mut replies = vec![Value::Nil; keys.len()];
                for (group, group_replies) in groups {
                    for (i, reply) in group.iter().zip(per_key(op, group.len(), group_replies)?) {
                        replies[*i] = reply;
                    }
                }
                Ok(replies)
            }
        }
    }

    /// A pipeline's and a script's keys must share a hash slot in Redis Cluster, so the batch
    /// is split by slot and the per-slot calls are sent concurrently (one round trip of
    /// latency). Each slot's key indices with that slot's replies.
    async fn cluster_batch(
        &self,
        conn: &ClusterConnection,
        op: Op,
        keys: &[&str],
    ) -> RedisResult<Vec<(Vec<usize>, Vec<Value>)>> {
        let mut slots: HashMap<Slot, Vec<usize>> = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            slots.entry(Slot::for_key(self.storage_key(key))).or_default().push(i);
        }
        let groups: Vec<Vec<usize>> = slots.into_values().collect();
        let requests = groups.iter().map(|group| {
            let group_keys: Vec<&str> = group.iter().map(|&i| keys[i]).collect();
            let pipe = self.pipeline(op, &group_keys);
            async move { query(conn, &pipe).await }
        });
        let results = futures::future::join_all(requests).await;
        groups
            .into_iter()
            .zip(results)
            .map(|(group, result)| result.map(|replies| (group, replies)))
            .collect()
    }

    /// The commands of `op` for `keys`, namespaced: one plain command per key, or one script
    /// call per [`KEYS_PER_SCRIPT`] keys.
    fn pipeline(&self, op: Op, keys: &[&str]) -> Pipeline {
        let mut pipe = Pipeline::with_capacity(match op {
            Op::ClaimNew | Op::Done => keys.len(),
            Op::Claim | Op::Release => keys.len().div_ceil(KEYS_PER_SCRIPT),
        });
        let script = match op {
            Op::ClaimNew | Op::Done => {
                let (value, ttl) = match op {
                    Op::ClaimNew => (self.owner.as_str(), self.lease_ttl),
                    _ => (DONE, self.done_ttl),
                };
                for key in keys {
                    let set = pipe.cmd("SET").arg(self.storage_key(key)).arg(value);
                    if op == Op::ClaimNew {
                        set.arg("NX");
                    }
                    set.arg("PX").arg(millis(ttl));
                }
                return pipe;
            }
            Op::Claim => &*CLAIM,
            Op::Release => &*RELEASE,
        };
        for chunk in keys.chunks(KEYS_PER_SCRIPT) {
            let mut invocation = script.arg(&self.owner);
            if op == Op::Claim {
                invocation.arg(millis(self.lease_ttl)).arg(DONE);
            }
            for key in chunk {
                invocation.key(self.storage_key(key));
            }
            pipe.invoke_script(&invocation);
        }
        pipe
    }

    /// Bounds a Redis call by `timeout` and maps its error.
    async fn bounded<T>(&self, call: impl Future<Output = RedisResult<T>>) -> Result<T, DedupError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(DedupError::Unavailable(e)),
            Err(_) => Err(DedupError::Timeout(self.timeout)),
        }
    }
}

impl fmt::Debug for Dedup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup")
            .field("target", &self.target)
            .field("namespace", &self.namespace)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// Sends `pipe`. A dropped connection is retried once (the connection reconnects on such
/// errors); a server that lost our scripts (restarted, new node) gets them loaded again.
async fn query<C: ConnectionLike + Clone>(conn: &C, pipe: &Pipeline) -> RedisResult<Vec<Value>> {
    let mut conn = conn.clone();
    let mut result = pipe.query_async(&mut conn).await;
    if matches!(&result, Err(e) if e.is_connection_dropped() || e.is_unrecoverable_error()) {
        result = pipe.query_async(&mut conn).await;
    }
    if matches!(&result, Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript)) {
        for script in [&*CLAIM, &*RELEASE] {
            script.load_async(&mut conn).await?;
        }
        result = pipe.query_async(&mut conn).await;
    }
    result
}

/// The replies of [`Dedup::pipeline`]'s commands for `keys` keys, one per key, in order:
/// a plain command answers `OK` (or nil: `SET NX` of a key that exists), a script call an
/// array with one entry per key.
fn per_key(op: Op, keys: usize, replies: Vec<Value>) -> Result<Vec<Value>, DedupError> {
    if matches!(op, Op::ClaimNew | Op::Done) {
        if replies.len() != keys {
            return Err(count_mismatch(replies.len(), keys));
        }
        return match replies
            .iter()
            .find(|r| !matches!((op, r), (_, Value::Okay) | (Op::ClaimNew, Value::Nil)))
        {
            Some(other) => Err(DedupError::UnexpectedReply(format!("{other:?} to SET"))),
            None => Ok(replies),
        };
    }
    let calls = keys.div_ceil(KEYS_PER_SCRIPT);
    if replies.len() != calls {
        return Err(count_mismatch(replies.len(), calls));
    }
    let mut out = Vec::with_capacity(keys);
    for reply in replies {
        match reply {
            Value::Array(items) => out.extend(items),
            other => return Err(DedupError::UnexpectedReply(format!("{other:?} to a script call"))),
        }
    }
    if out.len() != keys {
        return Err(DedupError::UnexpectedReply(format!(
            "{} replies for {keys} keys",
            out.len()
        )));
    }
    Ok(out)
}

fn count_mismatch(got: usize, sent: usize) -> DedupError {
    DedupError::UnexpectedReply(format!("{got} replies to {sent} commands"))
}

fn claim_reply(reply: Value) -> Result<Claim, DedupError> {
    match reply {
        Value::Int(0) => Ok(Claim::Done),
        Value::Int(1) => Ok(Claim::Claimed),
        Value::Int(2) => Ok(Claim::Busy),
        other => Err(DedupError::UnexpectedReply(format!("{other:?}"))),
    }
}

/// The distinct keys in order, and for each input key: the index of its distinct key and
/// whether it is that key's first occurrence.
fn first_occurrences(keys: &[String]) -> (Vec<&str>, Vec<(usize, bool)>) {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
    let mut unique = Vec::with_capacity(keys.len());
    let first = keys
        .iter()
        .map(|k| match index.get(k.as_str()) {
            Some(&u) => (u, false),
            None => {
                index.insert(k, unique.len());
                unique.push(k.as_str());
                (unique.len() - 1, true)
            }
        })
        .collect();
    (unique, first)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Unique per process: the pod name (when `HOSTNAME` is set) and pid help an operator see
/// who holds a lease; the random part keeps restarts and replicas apart.
fn owner_token() -> String {
    let random = hex::encode(rand::random::<[u8; 12]>());
    match std::env::var("HOSTNAME") {
        Ok(host) if !host.is_empty() => format!("{host}-{}-{random}", std::process::id()),
        _ => format!("{}-{random}", std::process::id()),
    }
}

fn redis_store(cfg: &DedupConfig) -> Result<Store, DedupError> {
    let client = if cfg.tls_ca_file.is_empty() {
        redis::Client::open(cfg.redis_url.as_str())
    } else {
        let ca = std::fs::read(&cfg.tls_ca_file)
            .map_err(|e| DedupError::Config(format!("dedup.tls_ca_file: cannot read {}: {e}", cfg.tls_ca_file)))?;
        let certs = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca),
        };
        redis::Client::build_with_tls(cfg.redis_url.as_str(), certs)
    }
    .map_err(|e| DedupError::Config(format!("dedup.redis_url: {e}")))?;
    let manager = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.timeout))
        .set_response_timeout(Some(cfg.timeout))
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_lazy_with_config(client, manager)
        .map(|conn| Store::Remote(Remote::Redis(conn)))
        .map_err(|e| DedupError::Config(format!("dedup.redis_url: {e}")))
}

fn cluster_store(cfg: &DedupConfig) -> Result<Store, DedupError> {
    let client = ClusterClientBuilder::new(cfg.cluster_urls.iter().map(String::as_str))
        .retries(3)
        .min_retry_wait(20)
        .max_retry_wait(500)
        .build()
        .map_err(|e| DedupError::Config(format!("dedup.cluster_urls: {e}")))?;
    let timeouts = ClusterConfig::new()
        .set_connection_timeout(cfg.timeout)
        .set_response_timeout(cfg.timeout);
    let handle = ClusterHandle::new(client, timeouts, cfg.timeout);
    Ok(Store::Remote(Remote::Cluster(Box::new(handle))))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn memory(lease_ttl: Duration) -> Dedup {
        let cfg = DedupConfig {
            lease_ttl,
            prefix: "pfx".into(),
            ..DedupConfig::default()
        };
        Dedup::connect(&cfg, "group-1")
            .await
            .expect("the in-memory store always connects")
    }

    fn keys(ks: &[&str]) -> Vec<String> {
        ks.iter().map(|k| k.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn without_redis_the_in_memory_store_claims_marks_done_and_releases() {
        let d = memory(Duration::from_secs(30)).await;
        assert_eq!(d.backend(), "memory");
        use Claim::*;
        assert_eq!(d.claim(&keys(&["a", "b"])).await.unwrap(), [Claimed, Claimed]);
        assert_eq!(d.claim(&keys(&["a"])).await.unwrap(), [Claimed], "our own lease");
        d.mark_done(&keys(&["a"])).await.unwrap();
        d.release(&keys(&["a", "b"])).await.unwrap();
        assert_eq!(d.claim(&keys(&["a", "b"])).await.unwrap(), [Done, Claimed]);
        assert_eq!(d.claim(&[]).await.unwrap(), []);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_repeated_in_one_batch_is_claimed_once() {
        let d = memory(Duration::from_secs(30)).await;
        use Claim::*;
        let batch = keys(&["k", "x", "k", "k"]);
        assert_eq!(d.claim(&batch).await.unwrap(), [Claimed, Claimed, Busy, Busy]);
        d.mark_done(&keys(&["k"])).await.unwrap();
        assert_eq!(d.claim(&batch).await.unwrap(), [Done, Claimed, Done, Done]);
    }

    #[tokio::test(start_paused = true)]
    async fn in_memory_keys_expire_with_the_clock() {
        let d = memory(Duration::from_secs(1)).await;
        d.claim(&keys(&["k"])).await.unwrap();
        d.mark_done(&keys(&["done"])).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        let Store::Memory(m) = &d.store else { unreachable!() };
        let now = Instant::now();
        let mut m = m.lock().unwrap();
        assert_eq!(m.claim(&d.storage_key("k"), "other", d.lease_ttl, now), Claim::Claimed);
        assert_eq!(m.claim(&d.storage_key("done"), "other", d.lease_ttl, now), Claim::Done);
    }

    #[tokio::test]
    async fn keys_are_namespaced_by_prefix_and_group_and_owners_are_unique() {
        let (a, b) = (
            memory(Duration::from_secs(1)).await,
            memory(Duration::from_secs(1)).await,
        );
        assert_eq!(a.storage_key("orders/3/42"), "pfx:group-1:orders/3/42");
        assert_ne!(a.owner(), b.owner());
        assert_ne!(a.owner(), DONE);
        let debug = format!("{a:?}");
        assert!(debug.contains("in-memory") && debug.contains(a.owner()), "{debug}");
    }

    #[tokio::test]
    async fn the_store_and_its_operations_can_move_between_tasks() {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        let d = memory(Duration::from_secs(1)).await;
        send_sync(&d);
        let batch = keys(&["k"]);
        send(d.claim(&batch));
        send(d.mark_done(&batch));
        send(d.release(&batch));
        send(d.ping());
    }

    #[test]
    fn batches_are_deduplicated_in_order() {
        let batch = keys(&["a", "b", "a", "c", "b"]);
        let (unique, first) = first_occurrences(&batch);
        assert_eq!(unique, ["a", "b", "c"]);
        assert_eq!(first, [(0, true), (1, true), (0, false), (2, true), (1, false)]);
    }

    #[test]
    fn script_replies_map_to_claims_and_anything_else_is_an_error() {
        assert_eq!(claim_reply(Value::Int(0)).unwrap(), Claim::Done);
        assert_eq!(claim_reply(Value::Int(1)).unwrap(), Claim::Claimed);
        assert_eq!(claim_reply(Value::Int(2)).unwrap(), Claim::Busy);
        let err = claim_reply(Value::Nil).unwrap_err();
        assert!(
            err.to_string().starts_with("redis unavailable: unexpected reply"),
            "{err}"
        );
    }

    #[test]
    fn script_call_replies_are_split_per_key_and_any_other_shape_is_an_error() {
        let ints = |n: usize| Value::Array(vec![Value::Int(1); n]);
        // 1201 keys: three calls of 500, 500 and 201 keys.
        let ok = per_key(Op::Claim, 1201, vec![ints(500), ints(500), ints(201)]).unwrap();
        assert_eq!(ok.len(), 1201);
        let set = vec![Value::Okay, Value::Nil, Value::Okay];
        assert_eq!(per_key(Op::ClaimNew, 3, set.clone()).unwrap(), set);
        assert_eq!(
            per_key(Op::Done, 2, vec![Value::Okay; 2]).unwrap(),
            vec![Value::Okay; 2]
        );
        let bad: Vec<(Op, usize, Vec<Value>)> = vec![
            (Op::Claim, 3, vec![]),
            (Op::Claim, 3, vec![ints(2)]),
            (Op::Claim, 3, vec![ints(4)]),
            (Op::Claim, 3, vec![ints(3), ints(3)]),
            (Op::Claim, 600, vec![ints(600)]),
            (Op::Claim, 2, vec![Value::Int(1)]),
            (Op::Claim, 2, vec![Value::Okay]),
            (Op::Release, 1, vec![Value::Nil]),
            (Op::Done, 2, vec![Value::BulkString(vec![0xff, 0])]),
            (Op::ClaimNew, 1, vec![]),
            (Op::ClaimNew, 1, vec![Value::Okay, Value::Okay]),
            (Op::ClaimNew, 2, vec![Value::Okay, Value::Int(1)]),
            (Op::ClaimNew, 1, vec![Value::SimpleString("OK".into())]),
            (Op::Done, 2, vec![Value::Okay, Value::Nil]),
            (Op::Done, 1, vec![Value::Array(vec![])]),
        ];
        for (op, keys, replies) in bad {
            let shown = format!("{replies:?}");
            let err = per_key(op, keys, replies).expect_err(&shown);
            assert!(matches!(err, DedupError::UnexpectedReply(_)), "{shown}: {err}");
        }
        // Each key's entry is checked again by `claim_reply`: a nested array is an error too.
        assert!(claim_reply(Value::Array(vec![Value::Int(1)])).is_err());
        assert!(claim_reply(Value::Int(3)).is_err());
    }

    #[test]
    fn errors_say_redis_is_unavailable_and_why() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let e = DedupError::Unavailable(io);
        assert!(e.to_string().starts_with("redis unavailable: "), "{e}");
        assert!(e.to_string().to_lowercase().contains("refused"), "{e}");
        let t = DedupError::Timeout(Duration::from_secs(2));
        assert_eq!(t.to_string(), "redis unavailable: no answer within 2s");
    }

    #[tokio::test]
    async fn a_bad_redis_url_or_ca_file_is_a_config_error() {
        let cfg = DedupConfig {
            redis_url: "rediss://127.0.0.1:1".into(),
            tls_ca_file: "/nonexistent/ca.pem".into(),
            ..DedupConfig::default()
        };
        let err = Dedup::connect_lazy(&cfg, "g").await.unwrap_err();
        assert!(matches!(err, DedupError::Config(_)), "{err}");
        assert!(err.to_string().contains("dedup.tls_ca_file"), "{err}");
    }
}
