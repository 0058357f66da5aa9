//! Test harness: the real broker, a real HTTP app on port 0, and the real sidecar binary.
#![allow(dead_code)]

pub mod kafka_server;
pub mod redis_server;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

pub fn brokers() -> String {
    std::env::var("KAFKA_SIDECAR_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The broker's TLS + SASL/SCRAM-SHA-512 listener (`scripts/env.sh` makes it).
pub fn sasl_brokers() -> String {
    std::env::var("KAFKA_SIDECAR_TEST_SASL_BROKERS").unwrap_or_else(|_| "127.0.0.1:9094".into())
}

/// The CA that signed the SASL_SSL listener's certificate: `$KAFKA_SIDECAR_CACHE/run/tls/ca.pem`,
/// as `scripts/env.sh` makes it, unless `KAFKA_SIDECAR_TEST_CA` names another file.
pub fn test_ca() -> PathBuf {
    if let Ok(path) = std::env::var("KAFKA_SIDECAR_TEST_CA") {
        return PathBuf::from(path);
    }
    let cache = std::env::var("KAFKA_SIDECAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kafka-sidecar"));
    cache.join("run/tls/ca.pem")
}

/// The SCRAM user `scripts/env.sh` creates (test-only credentials).
pub const SCRAM_USER: &str = "sidecar";
pub const SCRAM_PASSWORD: &str = "sidecar-secret";

/// `[kafka.properties]` for the SASL_SSL listener with the given password.
pub fn sasl_properties(password: &str) -> String {
    format!(
        r#"
[kafka.properties]
"security.protocol" = "SASL_SSL"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "{SCRAM_USER}"
"sasl.password" = "{password}"
"ssl.ca.location" = "{ca}"
"#,
        ca = test_ca().display()
    )
}

/// Fails the test (never skips it) when the SASL_SSL listener does not accept the test user.
pub fn require_sasl_kafka() {
    let how = "Start (or update) the test environment with `scripts/env.sh up`: it makes the CA, \
               the SCRAM user and the SASL_SSL listener, and restarts a broker started without them.";
    let ca = test_ca();
    assert!(ca.is_file(), "no test CA at {} ({how})", ca.display());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", sasl_brokers())
        .set("security.protocol", "SASL_SSL")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", SCRAM_USER)
        .set("sasl.password", SCRAM_PASSWORD)
        .set("ssl.ca.location", ca.to_string_lossy())
        .create()
        .expect("kafka client");
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!(
            "the SASL_SSL listener at {} does not accept user {SCRAM_USER} ({e}). {how}",
            sasl_brokers()
        );
    }
}

/// Fails the test (never skips it) when the broker is not there.
pub fn require_kafka() {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("kafka client");
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!(
            "Kafka is not reachable at {} ({e}). Start the test environment with `scripts/env.sh up` \
             (or run every test with `scripts/test.sh`, which starts it).",
            brokers()
        );
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_on(&brokers(), name, partitions).await
}

/// [`create_topic`] on another cluster (e.g. a [`kafka_server::TestKafka`]).
pub async fn create_topic_on(brokers: &str, name: &str, partitions: i32) {
    create_topic_on_with(brokers, name, partitions, &[]).await
}

/// Creates a topic with topic-level configs (e.g. `("max.message.bytes", "1048576")`).
pub async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    create_topic_on_with(&brokers(), name, partitions, configs).await
}

/// [`create_topic_with`] on another cluster.
pub async fn create_topic_on_with(brokers: &str, name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in configs {
        topic = topic.set(key, value);
    }
    let results = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("failed to create topic {t}: {e}"));
    }
}

/// A record to produce.
#[derive(Clone, Debug)]
pub struct Out {
    pub key: Option<String>,
    pub value: String,
    pub partition: Option<i32>,
    pub headers: Vec<(String, String)>,
}

impl Out {
    pub fn keyed(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: Some(key.into()),
            value: value.into(),
            partition: None,
            headers: vec![],
        }
    }
}

/// Produces records (acks=all) and waits until all are acknowledged.
pub async fn produce(topic: &str, records: Vec<Out>) {
    produce_to(&brokers(), topic, records).await
}

/// [`produce`] to another cluster (e.g. a [`kafka_server::TestKafka`]).
pub async fn produce_to(brokers: &str, topic: &str, records: Vec<Out>) {
    let topic = topic.to_string();
    let brokers = brokers.to_string();
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        for r in &records {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &r.headers {
                headers = headers.insert(rdkafka::message::Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let mut rec = BaseRecord::to(&topic).payload(r.value.as_bytes()).headers(headers);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_bytes());
            }
            if let Some(p) = r.partition {
                rec = rec.partition(p);
            }
            send_when_queue_has_room(&producer, rec, Duration::from_millis(50));
        }
        producer.flush(Duration::from_secs(120)).expect("flush");
    })
    .await
    .unwrap();
}

/// Sends a record, waiting (`wait` at a time, serving delivery reports) while the producer's
/// local queue is full; any other error fails the test.
pub fn send_when_queue_has_room<C: rdkafka::producer::ProducerContext>(
    producer: &BaseProducer<C>,
    mut rec: BaseRecord<
        '_,
        impl rdkafka::message::ToBytes + ?Sized,
        impl rdkafka::message::ToBytes + ?Sized,
        C::DeliveryOpaque,
    >,
    wait: Duration,
) {
    loop {
        match producer.send(rec) {
            Ok(()) => return,
            Err((e, back)) => {
                assert!(
                    matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull)
                    ),
                    "produce failed: {e}"
                );
                rec = back;
                producer.poll(wait);
            }
        }
    }
}

/// A record given as raw bytes: header names need not be UTF-8, anything may be null.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawOut {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<RawHeader>,
}

/// A header as bytes: name, and value (null when `None`).
pub type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// Produces raw records to partition 0 in order (acks=all), each in a batch of its own (so a
/// record at the topic's `max.message.bytes` is not batched with others). Returns the
/// broker's answer per record: `Err` with the error's text when it was rejected.
pub async fn produce_raw(topic: &str, records: Vec<RawOut>) -> Vec<Result<(), String>> {
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer<ProduceResult> = ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("acks", "all")
            .set("message.max.bytes", "100000000")
            .create_with_context(ProduceResult::default())
            .expect("producer");
        let mut results = Vec::new();
        for r in &records {
            let mut headers = OwnedHeaders::new();
            for (name, value) in &r.headers {
                // rdkafka's own insert takes the name as &str; this writes any bytes.
                headers = kafka_sidecar::record::native::add(headers, name, value.as_deref());
            }
            let mut rec = BaseRecord::<[u8], [u8]>::to(&topic).partition(0).headers(headers);
            if let Some(k) = &r.key {
                rec = rec.key(k.as_slice());
            }
            if let Some(v) = &r.value {
                rec = rec.payload(v.as_slice());
            }
            producer.send(rec).map_err(|(e, _)| e).expect("enqueue");
            producer.flush(Duration::from_secs(60)).expect("flush");
            results.push(
                producer
                    .context()
                    .last
                    .lock()
                    .unwrap()
                    .take()
                    .expect("a delivery report"),
            );
        }
        results
    })
    .await
    .unwrap()
}

/// Remembers the last delivery report of a producer.
#[derive(Default)]
struct ProduceResult {
    last: Mutex<Option<Result<(), String>>>,
}

impl rdkafka::ClientContext for ProduceResult {}

impl rdkafka::producer::ProducerContext for ProduceResult {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, _: ()) {
        *self.last.lock().unwrap() = Some(result.as_ref().map(|_| ()).map_err(|(e, _)| e.to_string()));
    }
}

/// Produces one record with kcat (a C producer, as a user would): `header` is kcat's
/// `-H name=value` argument as bytes, the key and value are `key:value` on stdin (`-K:`).
pub fn kcat_produce(topic: &str, header: &[u8], key_value: &[u8]) {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    let mut child = Command::new("kcat")
        .args(["-P", "-b", &brokers(), "-t", topic, "-p", "0", "-K:", "-H"])
        .arg(std::ffi::OsStr::from_bytes(header))
        .stdin(Stdio::piped())
        .spawn()
        .expect("kcat is installed (apt-get install kcat)");
    child.stdin.take().unwrap().write_all(key_value).unwrap();
    let status = child.wait().expect("kcat");
    assert!(status.success(), "kcat failed: {status}");
}

fn consumer(group: &str) -> BaseConsumer {
    consumer_on(&brokers(), group)
}

fn consumer_on(brokers: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// Committed offset per partition (-1 when none).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    committed_on(&brokers(), group, topic, partitions)
}

/// [`committed`] on another cluster.
pub fn committed_on(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    try_committed_on(brokers, group, topic, partitions).unwrap_or_else(|e| panic!("committed offsets: {e}"))
}

/// [`committed_on`], with the error instead of a panic (for loops that wait for a commit while
/// the broker may be busy or restarting).
pub fn try_committed_on(brokers: &str, group: &str, topic: &str, partitions: i32) -> Result<Vec<i64>, String> {
    let c = consumer_on(brokers, group);
    let result = {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        // Scoped so the list is dropped before the consumer (rdkafka drop-hang pitfall).
        let got = c.committed_offsets(tpl, Duration::from_secs(10));
        got.map(|got| {
            got.elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(o) => o,
                    _ => -1,
                })
                .collect()
        })
        .map_err(|e| e.to_string())
    };
    result
}

/// High watermark per partition.
pub fn end_offsets(topic: &str, partitions: i32) -> Vec<i64> {
    end_offsets_on(&brokers(), topic, partitions)
}

/// [`end_offsets`] on another cluster. Retries for up to 30 s: right after a broker restart
/// its metadata may not list the partition yet ("Unknown partition").
pub fn end_offsets_on(brokers: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c = consumer_on(brokers, "watermarks");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    (0..partitions)
        .map(|p| loop {
            match c.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                Ok((_, high)) => break high,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("watermarks of {topic}/{p}: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("watermarks of {topic}/{p}: {e}"),
            }
        })
        .collect()
}

/// Members of a consumer group (0 when the group does not exist).
pub fn group_members(group: &str) -> usize {
    let c = consumer("describer");
    let list = c
        .fetch_group_list(Some(group), Duration::from_secs(10))
        .expect("describe group");
    let n = list
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .map_or(0, |g| g.members().len());
    n
}

/// A record read back from a topic (e.g. the DLQ).
#[derive(Debug, Clone)]
pub struct Read {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Headers by name (names and values decoded lossily as UTF-8; the last of duplicates).
    pub headers: HashMap<String, String>,
    /// Headers exactly as stored, in order.
    pub raw_headers: Vec<RawHeader>,
}

/// Reads every record of a topic from the beginning up to its current end.
pub fn read_all(topic: &str, partitions: i32) -> Vec<Read> {
    read_all_on(&brokers(), topic, partitions)
}

/// [`read_all`] on another cluster.
pub fn read_all_on(brokers: &str, topic: &str, partitions: i32) -> Vec<Read> {
    let ends = end_offsets_on(brokers, topic, partitions);
    let total: i64 = ends.iter().sum();
    let c = consumer_on(brokers, &unique("reader"));
    let mut out = Vec::new();
    {
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
        }
        c.assign(&tpl).expect("assign");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < total && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            // Not rdkafka's header accessors: they panic on a name that is not UTF-8.
            let raw_headers: Vec<RawHeader> = kafka_sidecar::record::native::read(&m)
                .expect("headers readable")
                .into_iter()
                .map(|(name, value)| (name.to_vec(), value.map(|v| v.to_vec())))
                .collect();
            let headers = raw_headers
                .iter()
                .map(|(name, value)| {
                    (
                        String::from_utf8_lossy(name).into_owned(),
                        String::from_utf8_lossy(value.as_deref().unwrap_or_default()).into_owned(),
                    )
                })
                .collect();
            out.push(Read {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                headers,
                raw_headers,
            });
        }
    }
    assert_eq!(out.len() as i64, total, "could not read all of {topic}");
    out
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET a URL: (status, body); status 0 when the connection fails.
pub async fn http_get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// The value of one sample in Prometheus text, e.g. `metric(text, "x_total", &[("topic", "t")])`.
/// Sums over label sets that match all the given labels; `None` when no sample matches.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (label_part, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if labels.iter().all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\""))) {
            *found.get_or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request the app received.
#[derive(Debug, Clone)]
pub struct Request {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub attempt: u32,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    /// The value was null (`X-Kafka-Value-Null`, or `"value": null` in a batch).
    pub value_null: bool,
    /// The record's headers decoded from `X-Kafka-Headers` or the batch envelope (`name` or
    /// `name_base64`, base64 values); empty when there are none.
    pub record_headers: Vec<RawHeader>,
    pub headers: HeaderMap,
    pub status: u16,
    /// When the app received it.
    pub at: Instant,
}

impl Request {
    pub fn value_str(&self) -> String {
        String::from_utf8_lossy(&self.value).into_owned()
    }
    pub fn id(&self) -> (i32, i64) {
        (self.partition, self.offset)
    }
}

/// The app's answer to a request.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    pub status: u16,
    pub delay: Duration,
    pub retry_after: Option<u64>,
}

impl Answer {
    pub fn ok() -> Self {
        Self {
            status: 200,
            delay: Duration::ZERO,
            retry_after: None,
        }
    }
    pub fn status(status: u16) -> Self {
        Self { status, ..Self::ok() }
    }
}

type Behavior = Arc<dyn Fn(&Request) -> Answer + Send + Sync>;

struct AppState {
    behavior: Behavior,
    requests: Mutex<Vec<Request>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    max_batch: AtomicUsize,
}

/// A real HTTP server standing in for the app, on a TCP port or a Unix domain socket.
pub struct TestApp {
    state: Arc<AppState>,
    pub port: u16,
    /// The Unix socket it listens on instead of a TCP port ([`TestApp::start_unix`]).
    pub socket: Option<PathBuf>,
    stop: CancellationToken,
}

impl TestApp {
    pub async fn start(behavior: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> Self {
        Self::serve(Self::state(behavior), 0).await
    }

    /// The same app listening on the Unix domain socket `socket` (its URL is `unix://...`).
    pub async fn start_unix(
        socket: &std::path::Path,
        behavior: impl Fn(&Request) -> Answer + Send + Sync + 'static,
    ) -> Self {
        Self::serve_unix(Self::state(behavior), socket.to_path_buf()).await
    }

    fn state(behavior: impl Fn(&Request) -> Answer + Send + Sync + 'static) -> Arc<AppState> {
        Arc::new(AppState {
            behavior: Arc::new(behavior),
            requests: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            max_batch: AtomicUsize::new(0),
        })
    }

    fn router(state: Arc<AppState>) -> Router {
        Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .fallback(handle)
            // Records up to the broker's size limits, base64-encoded in a batch.
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
            .with_state(state)
    }

    async fn serve(state: Arc<AppState>, port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind app");
        let port = listener.local_addr().unwrap().port();
        let stop = CancellationToken::new();
        let app = Self::router(state.clone());
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            state,
            port,
            socket: None,
            stop,
        }
    }

    async fn serve_unix(state: Arc<AppState>, socket: PathBuf) -> Self {
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind the app's unix socket");
        let stop = CancellationToken::new();
        let app = Self::router(state.clone());
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(s.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            state,
            port: 0,
            socket: Some(socket),
            stop,
        }
    }

    pub fn url(&self) -> String {
        match &self.socket {
            Some(socket) => format!("unix://{}:/records", socket.display()),
            None => format!("http://127.0.0.1:{}/records", self.port),
        }
    }

    /// Stops listening (connections are refused until [`TestApp::restart`]; a Unix socket's
    /// file is removed, as when the app's container is gone).
    pub fn stop(&self) {
        self.stop.cancel();
        if let Some(socket) = &self.socket {
            let _ = std::fs::remove_file(socket);
        }
    }

    /// Listens again on the same port (or socket) with the same state.
    pub async fn restart(self) -> Self {
        self.stop();
        let state = self.state.clone();
        if let Some(socket) = self.socket.clone() {
            return Self::serve_unix(state, socket).await;
        }
        for _ in 0..50 {
            if tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self::serve(state, self.port).await
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Requests answered 2xx.
    pub fn delivered(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }

    pub fn delivered_count(&self) -> usize {
        self.state
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .count()
    }

    /// Largest batch received (batch mode).
    pub fn max_batch(&self) -> usize {
        self.state.max_batch.load(Ordering::SeqCst)
    }

    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn handle(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    if !headers.contains_key("x-kafka-topic") {
        return handle_batch(state, headers, body).await;
    }
    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut req = Request {
        topic: h("x-kafka-topic"),
        partition: h("x-kafka-partition").parse().unwrap_or(-1),
        offset: h("x-kafka-offset").parse().unwrap_or(-1),
        attempt: h("x-kafka-attempt").parse().unwrap_or(0),
        key: headers.get("x-kafka-key").map(|v| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .expect("key is base64")
        }),
        value: body.to_vec(),
        value_null: headers.contains_key("x-kafka-value-null"),
        record_headers: headers
            .get("x-kafka-headers")
            .map(|v| {
                let json: serde_json::Value = serde_json::from_slice(v.as_bytes()).expect("X-Kafka-Headers is JSON");
                decode_json_headers(&json)
            })
            .unwrap_or_default(),
        headers: headers.clone(),
        status: 0,
        at: Instant::now(),
    };
    let answer = (state.behavior)(&req);
    if !answer.delay.is_zero() {
        tokio::time::sleep(answer.delay).await;
    }
    req.status = answer.status;
    state.requests.lock().unwrap().push(req);
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut resp = StatusCode::from_u16(answer.status).unwrap().into_response();
    if let Some(secs) = answer.retry_after {
        resp.headers_mut()
            .insert("retry-after", secs.to_string().parse().unwrap());
    }
    resp
}

/// Batch mode: answers `{"results": [...]}` with the behavior's status for each record.
async fn handle_batch(state: Arc<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    use base64::Engine;
    let b64 = |v: &serde_json::Value| {
        v.as_str()
            .map(|s| base64::engine::general_purpose::STANDARD.decode(s).expect("base64"))
    };
    let envelope: serde_json::Value = serde_json::from_slice(&body).expect("batch body is JSON");
    let records = envelope["records"].as_array().expect("records array").clone();
    state.max_batch.fetch_max(records.len(), Ordering::SeqCst);
    let mut results = Vec::new();
    for r in &records {
        let mut req = Request {
            topic: r["topic"].as_str().unwrap().to_string(),
            partition: r["partition"].as_i64().unwrap() as i32,
            offset: r["offset"].as_i64().unwrap(),
            attempt: r["attempt"].as_u64().unwrap() as u32,
            key: b64(&r["key"]),
            value: b64(&r["value"]).unwrap_or_default(),
            value_null: r["value"].is_null(),
            record_headers: decode_json_headers(&r["headers"]),
            headers: headers.clone(),
            status: 0,
            at: Instant::now(),
        };
        req.status = (state.behavior)(&req).status;
        results.push(serde_json::json!({ "status": req.status }));
        state.requests.lock().unwrap().push(req);
    }
    axum::Json(serde_json::json!({ "results": results })).into_response()
}

/// Decodes record headers in the wire contract's JSON form, as an app would: `name` (UTF-8)
/// or `name_base64`, and a base64 or null `value`.
pub fn decode_json_headers(json: &serde_json::Value) -> Vec<RawHeader> {
    use base64::Engine;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("a base64 string"))
            .expect("valid base64")
    };
    json.as_array()
        .expect("headers are a JSON array")
        .iter()
        .map(|h| {
            let name = match (h.get("name"), h.get("name_base64")) {
                (Some(n), None) => n.as_str().expect("name is a string").as_bytes().to_vec(),
                (None, Some(n)) => b64(n),
                other => panic!("a header has exactly one of name and name_base64: {other:?}"),
            };
            let value = (!h["value"].is_null()).then(|| b64(&h["value"]));
            (name, value)
        })
        .collect()
}

/// Settings of one sidecar run.
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    pub group: String,
    pub topic: String,
    pub app_url: String,
    pub dlq: Option<String>,
    pub ordering: &'static str,
    /// "single" or "batch".
    pub mode: &'static str,
    pub workers: usize,
    /// Admin port (127.0.0.1); `None` disables the admin server.
    pub admin_port: Option<u16>,
    pub extra: String,
}

impl SidecarConfig {
    pub fn new(topic: &str, app: &TestApp) -> Self {
        Self {
            group: unique("group"),
            topic: topic.to_string(),
            app_url: app.url(),
            dlq: None,
            ordering: "key",
            mode: "single",
            workers: 8,
            admin_port: None,
            extra: String::new(),
        }
    }

    pub fn toml(&self) -> String {
        let dlq = self.dlq.as_deref().unwrap_or("");
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
topics = ["{topic}"]
commit_interval = "500ms"
session_timeout = "10s"

[app]
url = "{url}"
mode = "{mode}"
timeout = "5s"

[pipeline]
ordering = "{ordering}"
workers = {workers}

[retry]
initial_backoff = "50ms"
max_backoff = "1s"

[dlq]
topic = "{dlq}"

[admin]
listen = "{admin}"
lag_interval = "300ms"

[shutdown]
grace_period = "15s"
{extra}
"#,
            brokers = brokers(),
            group = self.group,
            topic = self.topic,
            url = self.app_url,
            ordering = self.ordering,
            mode = self.mode,
            workers = self.workers,
            admin = self.admin_port.map(|p| format!("127.0.0.1:{p}")).unwrap_or_default(),
            extra = self.extra,
        )
    }
}

/// The real `kafka-sidecar` binary running as a child process.
pub struct Sidecar {
    child: Child,
    dir: tempfile::TempDir,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kafka-sidecar"))
}

impl Sidecar {
    pub fn start(cfg: &SidecarConfig) -> Self {
        Self::start_toml(&cfg.toml())
    }

    pub fn start_toml(toml: &str) -> Self {
        Self::start_with_env(toml, &[])
    }

    pub fn start_with_env(toml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, toml).unwrap();
        let log = std::fs::File::create(dir.path().join("sidecar.log")).unwrap();
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info,librdkafka=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kafka-sidecar");
        Self { child, dir }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("signal");
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// Waits for the process to exit, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Resident memory of the process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sidecar.log")).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- sidecar log (last 60 lines) ----");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Waits until the group's committed offsets equal the end offsets; returns both (committed last seen).
pub async fn wait_committed_to_end(
    group: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> (Vec<i64>, Vec<i64>) {
    wait_committed_to_end_on(&brokers(), group, topic, partitions, timeout).await
}

/// [`wait_committed_to_end`] on another cluster.
pub async fn wait_committed_to_end_on(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> (Vec<i64>, Vec<i64>) {
    let ends = end_offsets_on(brokers, topic, partitions);
    let mut last = vec![];
    wait_until(timeout, || {
        last = committed_on(brokers, group, topic, partitions);
        last == ends
    })
    .await;
    (last, ends)
}

/// Fails unless the group's committed offsets reach the end offsets within a minute.
pub async fn assert_committed_to_end(group: &str, topic: &str, partitions: i32) {
    let (committed, ends) = wait_committed_to_end(group, topic, partitions, Duration::from_secs(60)).await;
    assert_eq!(committed, ends, "committed offsets never reached the end offsets");
}

/// Fails unless every `(partition, offset)` was delivered, each exactly once.
pub fn assert_each_offset_once(delivered: &[Request], expected: usize) {
    let mut seen: HashMap<(i32, i64), usize> = HashMap::new();
    for r in delivered {
        *seen.entry(r.id()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "delivered more than once ((partition, offset), times): {twice:?}"
    );
    assert_eq!(seen.len(), expected, "not every record was delivered");
}

/// The repository as cargo names it when it runs the tests, read at run time: a build cached
/// from a checkout at another path must still read this checkout's files.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}
