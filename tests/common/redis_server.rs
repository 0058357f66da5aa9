//! `redis-server` processes owned by one test each (started, stopped, restarted at will).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ENV_HINT: &str = "start the test environment with `bash scripts/env.sh up`";

/// A free port whose cluster bus port (+10000) is free too.
fn free_port_pair() -> u16 {
    for _ in 0..1_000 {
        let port = 20_000 + rand::random::<u16>() % 10_000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair found");
}

/// A `redis-server` this test owns: its own port and directory, killed on drop.
pub struct TestRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl TestRedis {
    pub fn start(extra: &[&str]) -> TestRedis {
        Self::start_with(|port| {
            let mut args = vec!["--port".to_string(), port.to_string()];
            args.extend(extra.iter().map(|s| s.to_string()));
            args
        })
    }

    pub fn start_tls(cert: &Path, key: &Path) -> TestRedis {
        Self::start_with(|port| {
            let (cert, key) = (cert.display().to_string(), key.display().to_string());
            vec![
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port.to_string(),
                "--tls-cert-file".into(),
                cert.clone(),
                "--tls-key-file".into(),
                key,
                "--tls-ca-cert-file".into(),
                cert,
                "--tls-auth-clients".into(),
                "no".into(),
            ]
        })
    }

    /// Tries a few ports: another process may take a free port before the server binds it.
    pub fn start_with(args: impl Fn(u16) -> Vec<String>) -> TestRedis {
        for _ in 0..5 {
            let port = free_port_pair();
            let mut server = TestRedis {
                port,
                dir: tempfile::tempdir().unwrap(),
                args: args(port),
                child: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (see the logs above)");
    }

    fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(&self.args)
            .args([
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server ({e}): {ENV_HINT}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return true;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                eprintln!("redis-server on port {} exited ({status}):\n{log}", self.port);
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli shutdown nosave`: the server exits and forgets its keys.
    pub fn shutdown_nosave(&mut self) {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "shutdown", "nosave"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): {ENV_HINT}"));
        let mut child = self.child.take().expect("server running");
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "shutdown: {status} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) {
        assert!(self.spawn(), "redis-server did not restart on port {}", self.port);
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
