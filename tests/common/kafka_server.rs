//! A single-node KRaft Kafka broker owned by one test: its own free ports and data directory,
//! stopped (killed, data kept) and restarted (same ports, same data) at will, killed on drop.
//!
//! It runs the jars `scripts/env.sh up` fetched into `$KAFKA_SIDECAR_CACHE` (default
//! `~/.cache/kafka-sidecar`)/`kafka-<version>/libs` with the same server.properties as the
//! shared broker. Starting takes a few seconds (one JVM to format the storage, one to run).
//!
//! ```ignore
//! let kafka = TestKafka::start();
//! create_topic_on(&kafka.bootstrap(), &topic, 3).await;
//! kafka.stop();    // outage: the process is killed, the data stays
//! kafka.restart(); // back on the same port with the same topics, offsets and groups
//! ```

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

pub const ENV_HINT: &str = "fetch the Kafka jars and java with `bash scripts/env.sh up`";

/// How long a start or restart may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A Kafka broker+controller this test owns.
pub struct TestKafka {
    /// Client (PLAINTEXT) port on 127.0.0.1.
    pub port: u16,
    /// KRaft controller port on 127.0.0.1.
    pub controller_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    watchdog: Option<Child>,
}

impl TestKafka {
    /// Formats fresh storage and starts the broker; returns once it answers metadata requests.
    /// Retries on other ports if one was taken between choosing and binding it.
    pub fn start() -> TestKafka {
        for _ in 0..3 {
            let mut kafka = TestKafka {
                port: super::free_port(),
                controller_port: super::free_port(),
                dir: tempfile::tempdir().expect("temp dir for the test broker"),
                child: None,
                watchdog: None,
            };
            kafka.write_config();
            kafka.format_storage();
            if kafka.spawn() {
                return kafka;
            }
        }
        panic!("could not start a test Kafka broker (see its log above)");
    }

    /// `bootstrap.servers` for clients of this broker.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL, like a crash or a lost node); its data directory stays.
    pub fn stop(&mut self) {
        // The watchdog first, so it never signals a pid that was already reaped.
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same ports with the same data; returns once it answers.
    pub fn restart(&mut self) {
        self.stop();
        // The old listener's port may take a moment to become bindable again.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !ports_free(&[self.port, self.controller_port]) {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            self.spawn(),
            "the test Kafka broker did not restart on port {}",
            self.port
        );
    }

    /// Whether a Kafka broker answers a metadata request on this broker's port (a plain TCP
    /// connect is no proof: once the broker is gone another test may bind the freed port, or a
    /// connect to it may meet itself).
    pub fn answers(&self) -> bool {
        answers_metadata(&self.bootstrap())
    }

    /// Whether the broker process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The broker's own log (WARN and above), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("kafka.log")
    }

    fn properties(&self) -> PathBuf {
        self.dir.path().join("server.properties")
    }

    fn write_config(&self) {
        let (host, port, cport) = ("127.0.0.1", self.port, self.controller_port);
        let data = self.dir.path().join("data");
        let props = format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@{host}:{cport}\n\
             listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{cport}\n\
             advertised.listeners=PLAINTEXT://{host}:{port}\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             controller.listener.names=CONTROLLER\n\
             log.dirs={data}\n\
             num.partitions=3\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=3\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n",
            data = data.display()
        );
        std::fs::write(self.properties(), props).expect("write server.properties");
        let log4j = "appender.out.type=Console\n\
                     appender.out.name=OUT\n\
                     appender.out.layout.type=PatternLayout\n\
                     appender.out.layout.pattern=[%d] %p %m (%c)%n\n\
                     rootLogger.level=WARN\n\
                     rootLogger.appenderRef.out.ref=OUT\n";
        std::fs::write(self.dir.path().join("log4j2.properties"), log4j).expect("write log4j2.properties");
    }

    fn java(&self) -> Command {
        let java =
            std::env::var("JAVA_HOME").map_or_else(|_| PathBuf::from("java"), |h| Path::new(&h).join("bin/java"));
        let mut cmd = Command::new(java);
        cmd.arg(format!(
            "-Dlog4j2.configurationFile={}",
            self.dir.path().join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", libs().display()));
        cmd
    }

    fn format_storage(&self) {
        let cluster_id = random_cluster_id();
        let out = self
            .java()
            .args([
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",
                "kafka.tools.StorageTool",
                "format",
                "-t",
            ])
            .arg(&cluster_id)
            .arg("-c")
            .arg(self.properties())
            .output()
            .unwrap_or_else(|e| panic!("cannot run java ({e}): {ENV_HINT}"));
        assert!(
            out.status.success(),
            "formatting the test broker's storage failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the JVM and waits until it answers; false (log printed) if it exited or hung.
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the broker log");
        let mut child = self
            .java()
            .args([
                "-Xms128m",
                "-Xmx512m",
                "-XX:+UseSerialGC",
                "-Djava.awt.headless=true",
                "kafka.Kafka",
            ])
            .arg(self.properties())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run java ({e}): {ENV_HINT}"));
        self.watchdog = spawn_watchdog(child.id());
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                eprintln!(
                    "test Kafka broker on port {} exited ({status}):\n{}",
                    self.port,
                    self.log()
                );
                return false;
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && answers_metadata(&self.bootstrap()) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = child.kill();
        let _ = child.wait();
        eprintln!(
            "test Kafka broker on port {} not ready in {READY_TIMEOUT:?}:\n{}",
            self.port,
            self.log()
        );
        false
    }
}

impl Drop for TestKafka {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The jars: `$KAFKA_SIDECAR_CACHE/kafka-$KAFKA_VERSION/libs` (defaults as in scripts/env.sh).
fn libs() -> PathBuf {
    let cache = std::env::var("KAFKA_SIDECAR_CACHE").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/kafka-sidecar"),
        PathBuf::from,
    );
    let version = std::env::var("KAFKA_VERSION").unwrap_or_else(|_| "4.3.1".into());
    let libs = cache.join(format!("kafka-{version}/libs"));
    assert!(
        libs.join(".complete").exists(),
        "the Kafka jars are not in {}: {ENV_HINT}",
        libs.display()
    );
    libs
}

/// A KRaft cluster id: 16 random bytes, base64url without padding (what `random-uuid` prints).
/// Like Kafka's own, never one starting with `-`, which the command line would take for an option.
fn random_cluster_id() -> String {
    use base64::Engine;
    loop {
        let bytes: [u8; 16] = rand::random();
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn answers_metadata(bootstrap: &str) -> bool {
    let Ok(client) = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "0")
        .create::<BaseConsumer>()
    else {
        return false;
    };
    let answered = client
        .fetch_metadata(None, Duration::from_secs(2))
        .is_ok_and(|md| !md.brokers().is_empty());
    answered
}

fn ports_free(ports: &[u16]) -> bool {
    ports
        .iter()
        .all(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
}

/// Kills the broker if this test process dies without running `Drop` (SIGKILL, abort), so no
/// JVM outlives the test run.
fn spawn_watchdog(java_pid: u32) -> Option<Child> {
    let script = format!(
        "while kill -0 {test} 2>/dev/null && kill -0 {java} 2>/dev/null; do sleep 1; done; kill -9 {java} 2>/dev/null",
        test = std::process::id(),
        java = java_pid
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}
