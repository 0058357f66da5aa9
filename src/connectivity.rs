//! Broker connectivity: whether the sidecar can reach the Kafka cluster, as one state that
//! `/status` (`"kafka"`), the `kafka_sidecar_kafka_connected` gauge and the log agree on.
//!
//! librdkafka reconnects on its own and reports every failed attempt (log lines with facility
//! `FAIL`, transport errors on the error callback): during a 15 s outage that is dozens of
//! lines per client. Those raw reports are demoted to debug; the state changes here are
//! logged once each — "cannot reach the Kafka brokers" when the cluster becomes unreachable,
//! "connected to the Kafka brokers again" when it answers again.
//!
//! Signals: `ALL_BROKERS_DOWN` and other transport errors from any client make the cluster
//! suspect; the lag monitor then confirms with a metadata request of its own (and repeats it
//! once per second while the brokers are unreachable), and every record read marks it
//! reachable. Confirming matters: librdkafka also reports `ALL_BROKERS_DOWN` when it drops a
//! connection whose requests timed out and reconnects a millisecond later. Nothing here decides
//! what the pipeline does: consumption simply stalls while the brokers are gone and resumes
//! when librdkafka reconnects, with nothing lost (uncommitted records are read again).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// What `/status` shows under `"kafka"`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectivityView {
    pub connected: bool,
    /// When the current state began.
    pub since: SystemTime,
    /// Why the brokers cannot be reached (None while connected).
    pub error: Option<String>,
}

#[derive(Debug)]
struct State {
    connected: bool,
    /// Ever connected since start (the first connection is logged differently).
    ever: bool,
    since: SystemTime,
    since_instant: Instant,
    error: Option<String>,
}

/// The shared connectivity state.
pub struct Connectivity {
    brokers: String,
    state: Mutex<State>,
    /// Mirrors `state.connected` for the hot path (a read record calls [`Connectivity::up`]).
    connected: AtomicBool,
    /// A client reported a transport failure; the lag monitor should check now.
    suspect: AtomicBool,
    /// The last transport failure a client reported (it names the broker and the cause, e.g.
    /// "Connect to ipv4#10.0.0.7:9092 failed: Connection refused"), shown with an outage.
    last_failure: Mutex<Option<String>>,
}

impl Default for Connectivity {
    fn default() -> Self {
        Self::new("")
    }
}

impl Connectivity {
    /// Starts disconnected ("not connected yet") until the first answer from a broker.
    pub fn new(brokers: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            state: Mutex::new(State {
                connected: false,
                ever: false,
                since: SystemTime::now(),
                since_instant: Instant::now(),
                error: Some("not connected yet".into()),
            }),
            connected: AtomicBool::new(false),
            suspect: AtomicBool::new(false),
            last_failure: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn view(&self) -> ConnectivityView {
        let s = self.lock();
        ConnectivityView {
            connected: s.connected,
            since: s.since,
            error: s.error.clone(),
        }
    }

    /// A broker answered. Logs the change once.
    pub fn up(&self) {
        // Called for every record read: only read the shared flags on the way through.
        if self.suspect.load(Ordering::Relaxed) {
            self.suspect.store(false, Ordering::Relaxed);
        }
        if self.is_connected() {
            return;
        }
        let mut s = self.lock();
        if s.connected {
            return;
        }
        if s.ever {
            let down_for = s.since_instant.elapsed();
            tracing::info!(brokers = %self.brokers, down_for = ?round(down_for), "connected to the Kafka brokers again");
        } else {
            tracing::info!(brokers = %self.brokers, "connected to the Kafka brokers");
        }
        *s = State {
            connected: true,
            ever: true,
            since: SystemTime::now(),
            since_instant: Instant::now(),
            error: None,
        };
        self.connected.store(true, Ordering::Relaxed);
    }

    /// The brokers cannot be reached (confirmed). Logs the change once; later reasons only
    /// update the error shown in `/status`.
    pub fn down(&self, error: &str) {
        let mut s = self.lock();
        if !s.connected {
            if s.error.as_deref() != Some(error) {
                if !s.ever && s.error.as_deref() == Some("not connected yet") {
                    log_unreachable(&self.brokers, error);
                }
                s.error = Some(error.to_string());
            }
            return;
        }
        log_unreachable(&self.brokers, error);
        *s = State {
            connected: false,
            ever: true,
            since: SystemTime::now(),
            since_instant: Instant::now(),
            error: Some(error.to_string()),
        };
        self.connected.store(false, Ordering::Relaxed);
    }

    /// A request failed in a way that suggests the brokers are gone: not yet a state change
    /// (a connection may drop and come back at once), but the lag monitor checks now.
    pub fn suspect(&self) {
        self.suspect.store(true, Ordering::Relaxed);
    }

    /// librdkafka reported a transport failure, e.g. "127.0.0.1:9092/1: Connect to
    /// ipv4#127.0.0.1:9092 failed: Connection refused": remembered to explain an outage.
    pub fn report(&self, failure: &str) {
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure.to_string());
        self.suspect();
    }

    /// A check failed with `error`: the brokers cannot be reached. The outage's error names
    /// the last failure a client reported too, which says more than a timed-out request.
    pub fn check_failed(&self, error: &str) {
        let last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match last {
            Some(failure) if failure != error => self.down(&format!("{error} (last failure: {failure})")),
            _ => self.down(error),
        }
    }

    /// Whether the lag monitor should check reachability now (unreachable, or suspected),
    /// once the brokers answered a first time. Before that the source's connect loop reports
    /// reachability: it also tells a rejected login or TLS handshake from brokers that cannot
    /// be reached, which a timed-out metadata request here cannot.
    pub fn needs_check(&self) -> bool {
        (!self.is_connected() || self.suspect.load(Ordering::Relaxed)) && self.lock().ever
    }
}

fn log_unreachable(brokers: &str, error: &str) {
    tracing::error!(
        brokers,
        error,
        "cannot reach the Kafka brokers; retrying until they answer (consumption waits, nothing is lost)"
    );
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64 / 100 * 100)
}

/// Whether an error means "cannot talk to a broker" (as opposed to a request or data error).
pub fn is_transport_error(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(
            BrokerTransportFailure
                | AllBrokersDown
                | Resolve
                | BrokerNotAvailable
                | NetworkException
                | OperationTimedOut
                | RequestTimedOut
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connectivity {
        Connectivity::new("b:9092")
    }

    #[test]
    fn starts_disconnected_until_a_broker_answers() {
        let c = conn();
        assert!(!c.view().connected);
        assert!(!c.is_connected());
        c.up();
        assert!(c.view().connected);
        assert!(c.is_connected());
        assert_eq!(c.view().error, None);
    }

    #[test]
    fn an_outage_is_one_state_change_whatever_the_number_of_reports() {
        let c = conn();
        c.up();
        let before = c.view().since;
        c.down("transport failure");
        let down = c.view();
        assert!(!down.connected);
        assert!(down.since >= before);
        c.down("connection refused");
        assert_eq!(c.view().since, down.since, "a second report is not a new outage");
        assert_eq!(c.view().error.as_deref(), Some("connection refused"));
        c.up();
        assert!(c.view().connected);
        assert!(c.is_connected());
    }

    #[test]
    fn a_transport_error_is_only_a_reason_to_check() {
        let c = conn();
        c.up();
        assert!(!c.needs_check());
        assert!(is_transport_error(&KafkaError::Global(
            RDKafkaErrorCode::AllBrokersDown
        )));
        c.report("127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused");
        assert!(c.view().connected, "not an outage until a check fails");
        assert!(c.needs_check());
        c.up();
        assert!(!c.needs_check(), "the check succeeded");
        c.report("127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused");
        c.check_failed("Meta data fetch error: BrokerTransportFailure");
        let down = c.view();
        assert!(!down.connected);
        assert!(
            down.error.unwrap_or_default().contains("Connection refused"),
            "the cause shows"
        );
    }

    #[test]
    fn before_the_first_connection_the_connect_loop_reports_and_the_monitor_does_not_check() {
        let c = conn();
        c.report("sasl_ssl://b:9094/bootstrap: SASL authentication error: invalid credentials");
        assert!(!c.needs_check(), "the connect loop owns start-up reporting");
        c.up();
        c.report("b:9092/1: Connect to ipv4#127.0.0.1:9092 failed: Connection refused");
        assert!(
            c.needs_check(),
            "after the first connection the monitor confirms outages"
        );
    }

    #[test]
    fn request_errors_are_not_transport_errors() {
        let e = KafkaError::Global(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(!is_transport_error(&e));
    }
}
