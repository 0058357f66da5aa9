//! Traces in a real Jaeger (v1.76.0, built by `scripts/jaeger.sh build`): the sidecar exports
//! over OTLP gRPC and OTLP HTTP (one run each) to a Jaeger this test starts (127.0.0.1, free
//! ports, in-memory storage), and the test reads the traces back through Jaeger's query API.
//!
//! The test stands in for the producer and the app: it reports the producer's `send` span
//! (the record's `traceparent`) and the app's server span (parent: the `traceparent` the app
//! received) to the same Jaeger over OTLP/HTTP JSON, so each trace is whole: producer →
//! sidecar `process` span → app server span, and for a poison record also → the sidecar's
//! dead-letter `send` span. The sidecar logs JSON; its lines inside a delivery must carry the
//! ids Jaeger shows.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

/// The Jaeger binary: `$KAFKA_SIDECAR_JAEGER`, else where `scripts/jaeger.sh build` caches it.
fn jaeger_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KAFKA_SIDECAR_JAEGER") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("KAFKA_SIDECAR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kafka-sidecar"));
    cache.join("jaeger-v1.76.0/jaeger")
}

/// A Jaeger process of this test: OTLP receivers and the query API on free 127.0.0.1 ports,
/// traces in memory. Killed on drop.
struct Jaeger {
    child: Child,
    otlp_grpc: u16,
    otlp_http: u16,
    query: u16,
    dir: tempfile::TempDir,
}

impl Jaeger {
    async fn start() -> Self {
        let bin = jaeger_binary();
        assert!(
            bin.is_file(),
            "Jaeger is missing at {}: run `bash scripts/jaeger.sh build` (bash scripts/test.sh builds it \
             in the background), or set KAFKA_SIDECAR_JAEGER to a jaeger v1.76.0 binary",
            bin.display()
        );
        let (otlp_grpc, otlp_http, query, query_grpc) = (free_port(), free_port(), free_port(), free_port());
        // Only what the test needs: no sampling, health or metrics endpoints (the collector's
        // own telemetry is off, so nothing listens on its default :8888).
        let config = format!(
            r#"
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: []
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:{query}
    grpc:
      endpoint: 127.0.0.1:{query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{otlp_grpc}
      http:
        endpoint: 127.0.0.1:{otlp_http}
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"#
        );
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("jaeger.yaml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("jaeger.log")).unwrap();
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut jaeger = Self {
            child,
            otlp_grpc,
            otlp_http,
            query,
            dir,
        };
        let url = format!("http://127.0.0.1:{query}/api/services");
        let mut up = false;
        for _ in 0..600 {
            if http_get(&url).await.0 == 200 && tcp_open(otlp_grpc) && tcp_open(otlp_http) {
                up = true;
                break;
            }
            if let Ok(Some(status)) = jaeger.child.try_wait() {
                panic!("jaeger exited ({status}):\n{}", jaeger.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(up, "jaeger did not come up within 60 s:\n{}", jaeger.log());
        jaeger
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("jaeger.log")).unwrap_or_default()
    }

    /// The trace through the v1 query API (`/api/traces/{id}`): `None` until Jaeger has it.
    async fn trace(&self, trace_id: &str) -> Option<Trace> {
        let (status, body) = http_get(&format!("http://127.0.0.1:{}/api/traces/{trace_id}", self.query)).await;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        let t = v["data"].get(0)?;
        let services: HashMap<String, String> = t["processes"]
            .as_object()?
            .iter()
            .map(|(id, p)| (id.clone(), p["serviceName"].as_str().unwrap_or("").to_string()))
            .collect();
        let spans = t["spans"]
            .as_array()?
            .iter()
            .map(|s| Span {
                trace_id: s["traceID"].as_str().unwrap_or("").to_string(),
                span_id: s["spanID"].as_str().unwrap_or("").to_string(),
                name: s["operationName"].as_str().unwrap_or("").to_string(),
                service: services
                    .get(s["processID"].as_str().unwrap_or(""))
                    .cloned()
                    .unwrap_or_default(),
                parent: s["references"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["refType"] == "CHILD_OF")
                    .and_then(|r| r["spanID"].as_str())
                    .map(str::to_string),
                tags: s["tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        let value = match &t["value"] {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        };
                        (t["key"].as_str().unwrap_or("").to_string(), value)
                    })
                    .collect(),
            })
            .collect();
        Some(Trace { spans })
    }

    /// Polls until the trace has at least `spans` spans; panics with what it has otherwise.
    async fn wait_trace(&self, trace_id: &str, spans: usize, sidecar: &Sidecar) -> Trace {
        let mut last = None;
        for _ in 0..600 {
            last = self.trace(trace_id).await;
            if last.as_ref().is_some_and(|t| t.spans.len() >= spans) {
                return last.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "Jaeger never had {spans} spans of trace {trace_id}; has {:#?}\n--- sidecar ---\n{}\n--- jaeger ---\n{}",
            last.map(|t| t.spans),
            sidecar.log(),
            self.log()
        );
    }

    /// Reports one span over OTLP/HTTP JSON, as the producer or the app would.
    async fn report(&self, service: &str, span: Value) {
        let body = json!({
            "resourceSpans": [{
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                "scopeSpans": [{"scope": {"name": "tests/jaeger.rs"}, "spans": [span]}]
            }]
        });
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/v1/traces", self.otlp_http))
            .json(&body)
            .send()
            .await
            .expect("OTLP/HTTP post to Jaeger");
        assert!(r.status().is_success(), "Jaeger refused a span: {}", r.status());
    }
}

impl Drop for Jaeger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tcp_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    name: String,
    service: String,
    parent: Option<String>,
    tags: HashMap<String, String>,
}

impl Span {
    fn tag(&self, key: &str) -> &str {
        self.tags.get(key).map_or("<missing>", String::as_str)
    }
}

struct Trace {
    spans: Vec<Span>,
}

impl Trace {
    fn named(&self, name: &str) -> &Span {
        let found: Vec<&Span> = self.spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one span named {name:?} in {:#?}", self.spans);
        found[0]
    }

    fn child_of(&self, parent: &str, service: &str) -> &Span {
        let found: Vec<&Span> = self
            .spans
            .iter()
            .filter(|s| s.parent.as_deref() == Some(parent) && s.service == service)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one {service} span child of {parent} in {:#?}",
            self.spans
        );
        found[0]
    }
}

fn now_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// An OTLP JSON span (kind: 2 server, 4 producer).
fn otlp_span(trace_id: &str, span_id: &str, parent: Option<&str>, name: &str, kind: u8) -> Value {
    let end = now_nanos();
    let mut span = json!({
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": kind,
        "startTimeUnixNano": (end - 2_000_000).to_string(),
        "endTimeUnixNano": end.to_string(),
    });
    if let Some(p) = parent {
        span["parentSpanId"] = json!(p);
    }
    span
}

/// `00-<trace>-<span>-01` → (trace, span).
fn parse_traceparent(tp: &str) -> (String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp:?}");
    (parts[1].to_string(), parts[2].to_string())
}

/// The sidecar's JSON log lines.
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect()
}

/// One run: a good and a poison record, each with its producer's `traceparent`, through a
/// sidecar exporting with `protocol` to its own Jaeger.
async fn traces_land_in_jaeger(protocol: &str) {
    require_kafka();
    let jaeger = Jaeger::start().await;
    let topic = unique("jaeger");
    let dlq = unique("jaeger-dlq");
    create_topic(&topic, 1).await;
    create_topic(&dlq, 1).await;

    // The producer: one span per record, its context in the record's traceparent.
    let (good_trace, good_parent) = (random_hex(16), random_hex(8));
    let (poison_trace, poison_parent) = (random_hex(16), random_hex(8));
    let mut records = Vec::new();
    for (trace, parent, value) in [
        (&good_trace, &good_parent, "good"),
        (&poison_trace, &poison_parent, "poison"),
    ] {
        let mut out = Out::keyed("order-1", value);
        out.headers
            .push(("traceparent".into(), format!("00-{trace}-{parent}-01")));
        records.push(out);
        jaeger
            .report(
                "test-producer",
                otlp_span(trace, parent, None, &format!("send {topic}"), 4),
            )
            .await;
    }
    produce(&topic, records).await;

    let app = TestApp::start(|r| {
        if r.value_str() == "poison" {
            Answer::status(422)
        } else {
            Answer::ok()
        }
    })
    .await;
    let mut cfg = SidecarConfig::new(&topic, &app);
    cfg.dlq = Some(dlq.clone());
    let endpoint = match protocol {
        "grpc" => format!("http://127.0.0.1:{}", jaeger.otlp_grpc),
        _ => format!("http://127.0.0.1:{}/v1/traces", jaeger.otlp_http),
    };
    cfg.extra = format!(
        "[telemetry]\notlp_endpoint = \"{endpoint}\"\nprotocol = \"{protocol}\"\nservice_name = \"sidecar-under-test\"\n\n\
         [log]\nformat = \"json\"\nlevel = \"info,kafka_sidecar=debug\"\n"
    );
    let sidecar = Sidecar::start_with_env(&cfg.toml(), &[("OTEL_BSP_SCHEDULE_DELAY", "200")]);

    assert!(
        wait_until(MINUTE, || app.requests().len() == 2 && read_all(&dlq, 1).len() == 1).await,
        "the good record delivered, the poison one dead-lettered\n{}",
        sidecar.log()
    );
    // The app: a server span per request, child of the traceparent it received.
    let mut app_spans = HashMap::new();
    for req in app.requests() {
        let tp = req
            .headers
            .get("traceparent")
            .expect("the app gets a traceparent")
            .to_str()
            .unwrap()
            .to_string();
        let (trace, parent) = parse_traceparent(&tp);
        let span_id = random_hex(8);
        jaeger
            .report("test-app", otlp_span(&trace, &span_id, Some(&parent), "POST /", 2))
            .await;
        app_spans.insert(req.value_str(), (trace, parent, span_id));
    }

    // Good record: producer -> process (sidecar) -> app server span.
    let trace = jaeger.wait_trace(&good_trace, 3, &sidecar).await;
    let producer = trace.named(&format!("send {topic}"));
    assert_eq!(producer.service, "test-producer");
    let process = trace.named(&format!("process {topic}"));
    assert_eq!(process.trace_id, good_trace, "the producer's trace id");
    assert_eq!(process.service, "sidecar-under-test");
    assert_eq!(
        process.parent.as_deref(),
        Some(good_parent.as_str()),
        "the delivery span is a child of the record's span"
    );
    assert_eq!(process.tag("span.kind"), "consumer");
    assert_eq!(process.tag("messaging.system"), "kafka");
    assert_eq!(process.tag("messaging.operation.type"), "process");
    assert_eq!(process.tag("messaging.operation.name"), "process");
    assert_eq!(process.tag("messaging.destination.name"), topic);
    assert_eq!(process.tag("messaging.destination.partition.id"), "0");
    assert_eq!(process.tag("messaging.kafka.offset"), "0");
    assert_eq!(process.tag("messaging.consumer.group.name"), cfg.group);
    assert_eq!(process.tag("messaging.kafka.message.key"), "order-1");
    assert_eq!(process.tag("kafka_sidecar.delivery.outcome"), "delivered");
    assert_eq!(process.tag("kafka_sidecar.delivery.attempts"), "1");
    assert!(
        !process.tags.contains_key("error.type"),
        "no error.type on success: {process:?}"
    );
    let (_, app_parent, app_span) = &app_spans["good"];
    assert_eq!(
        app_parent, &process.span_id,
        "the app's traceparent names the delivery span"
    );
    let server = trace.child_of(&process.span_id, "test-app");
    assert_eq!(&server.span_id, app_span);
    assert_eq!(server.tag("span.kind"), "server");

    // Poison record: producer -> process (error) -> app server span, and -> DLQ send span.
    let trace = jaeger.wait_trace(&poison_trace, 4, &sidecar).await;
    let process = trace.named(&format!("process {topic}"));
    assert_eq!(process.parent.as_deref(), Some(poison_parent.as_str()));
    assert_eq!(process.tag("messaging.kafka.offset"), "1");
    assert_eq!(process.tag("kafka_sidecar.delivery.outcome"), "dead_lettered");
    assert_eq!(process.tag("error.type"), "http_422");
    assert_eq!(process.tag("otel.status_code"), "ERROR");
    let (_, app_parent, _) = &app_spans["poison"];
    assert_eq!(app_parent, &process.span_id);
    trace.child_of(&process.span_id, "test-app");
    let send = trace.named(&format!("send {dlq}"));
    assert_eq!(send.service, "sidecar-under-test");
    assert_eq!(
        send.parent.as_deref(),
        Some(process.span_id.as_str()),
        "the DLQ write is part of the delivery"
    );
    assert_eq!(send.tag("span.kind"), "producer");
    assert_eq!(send.tag("messaging.system"), "kafka");
    assert_eq!(send.tag("messaging.operation.type"), "send");
    assert_eq!(send.tag("messaging.operation.name"), "send");
    assert_eq!(send.tag("messaging.destination.name"), dlq);
    assert_eq!(send.tag("messaging.destination.partition.id"), "0");
    assert_eq!(send.tag("messaging.kafka.offset"), "0");
    let dead = &read_all(&dlq, 1)[0];
    assert_eq!(
        dead.headers.get("traceparent"),
        Some(&format!("00-{poison_trace}-{}-01", send.span_id)),
        "the dead letter's creation context is the DLQ send span"
    );

    // JSON logs: every line written inside a delivery carries its trace and span ids, and the
    // dead-letter line names the poison record's delivery span as Jaeger shows it.
    let lines = json_lines(&sidecar.log());
    assert!(
        !lines.is_empty(),
        "log.format = json writes JSON lines:\n{}",
        sidecar.log()
    );
    let inside: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["name"] == "delivery" || s["name"] == "record"))
        })
        .collect();
    assert!(
        !inside.is_empty(),
        "no line logged inside a delivery:\n{}",
        sidecar.log()
    );
    for line in &inside {
        assert!(
            line["trace_id"]
                .as_str()
                .is_some_and(|t| t == good_trace || t == poison_trace)
                && line["span_id"].as_str().is_some_and(|s| s.len() == 16),
            "a line inside a delivery without its trace_id/span_id: {line}"
        );
    }
    let dead_lettering: Vec<&&Value> = inside
        .iter()
        .filter(|l| l["fields"]["message"] == "dead-lettering record")
        .collect();
    assert_eq!(dead_lettering.len(), 1, "{inside:#?}");
    assert_eq!(dead_lettering[0]["trace_id"], poison_trace.as_str());
    assert_eq!(
        dead_lettering[0]["span_id"],
        process.span_id.as_str(),
        "the log line's span is the delivery span Jaeger shows"
    );
    let outside = lines.iter().filter(|l| !inside.contains(l));
    for line in outside {
        assert!(
            line.get("trace_id").is_none(),
            "a line outside a delivery with a trace id: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_exported_over_otlp_grpc_reach_jaeger_parented_producer_to_sidecar_to_app_and_dlq() {
    traces_land_in_jaeger("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_exported_over_otlp_http_reach_jaeger_parented_producer_to_sidecar_to_app_and_dlq() {
    traces_land_in_jaeger("http/protobuf").await;
}
