//! Kafka client settings and callbacks shared by every librdkafka client the sidecar makes:
//! the consumer ([`crate::source`]), the DLQ producer ([`crate::dlq`]) and the lag monitor
//! ([`crate::lag`]).
//!
//! Guaranteed: every client connects with the same connection and security settings (taken
//! from `[kafka.properties]`), and every client's log and error callbacks feed the one
//! [`Connectivity`] state and demote librdkafka's reconnect noise to debug. This module knows
//! nothing of the pipeline; it depends only on the config and the connectivity state.

use std::sync::Arc;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use crate::config::Config;
use crate::connectivity::{is_transport_error, Connectivity};

/// Connection and security settings (`security.protocol`, `sasl.*`, `ssl.*`, ...) shared by
/// every Kafka client the sidecar makes besides the consumer (DLQ producer, lag monitor).
pub fn connection_config(cfg: &Config, client_suffix: &str) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("client.id", format!("{}{client_suffix}", cfg.kafka.client_id));
    for (k, v) in cfg.kafka.properties.iter().filter(|(k, _)| is_connection_property(k)) {
        cc.set(k, v);
    }
    cc
}

fn is_connection_property(key: &str) -> bool {
    [
        "security.protocol",
        "sasl.",
        "ssl.",
        "socket.",
        "broker.",
        "client.dns.lookup",
        "enable.ssl",
    ]
    .iter()
    .any(|p| key.starts_with(p))
}

/// Whether an error means the connection's TLS or SASL handshake failed.
fn is_security_error(error: &KafkaError) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        error.rdkafka_error_code(),
        Some(SSL | Authentication | SaslAuthenticationFailed)
    )
}

/// Log and error callbacks shared by every Kafka client of the sidecar: transport failures
/// feed [`Connectivity`] (when given) and go to debug; everything else is logged as before.
#[derive(Clone, Default)]
pub struct KafkaLogContext {
    connectivity: Option<Arc<Connectivity>>,
}

impl KafkaLogContext {
    pub fn new(connectivity: Arc<Connectivity>) -> Self {
        Self {
            connectivity: Some(connectivity),
        }
    }

    /// A context that only demotes transport noise (for clients whose connectivity the
    /// consumer already reports, e.g. the DLQ producer).
    pub fn quiet() -> Self {
        Self::default()
    }
}

impl ClientContext for KafkaLogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel::*;
        // FAIL: a broker connection failed or closed; librdkafka retries with backoff and
        // the connectivity state reports the outage once.
        if fac == "FAIL" {
            return tracing::debug!(target: "librdkafka", fac, "{message}");
        }
        match level {
            Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{message}"),
            Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
            Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
            Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if is_transport_error(&error) {
            if let Some(c) = &self.connectivity {
                // "1/1 brokers are down" says less than the failure that led to it.
                if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
                    c.suspect();
                } else {
                    c.report(reason);
                }
            }
            return tracing::debug!(target: "librdkafka", error = %error, "kafka client transport error: {reason}");
        }
        // A TLS or SASL failure needs a fix, so it stays an error line; it is also why the
        // brokers cannot be reached, so /status shows it.
        if is_security_error(&error) {
            if let Some(c) = &self.connectivity {
                c.report(reason);
            }
        }
        tracing::error!(target: "librdkafka", error = %error, "kafka client error: {reason}");
    }
}

impl ConsumerContext for KafkaLogContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_or_sasl_failure_is_why_the_brokers_cannot_be_reached() {
        let c = Arc::new(Connectivity::new("b:9092"));
        c.up();
        let ctx = KafkaLogContext::new(c.clone());
        ctx.error(
            KafkaError::Global(RDKafkaErrorCode::Authentication),
            "SASL authentication error: invalid credentials",
        );
        assert!(c.needs_check());
        c.check_failed("Meta data fetch error: OperationTimedOut");
        assert!(c.view().error.unwrap_or_default().contains("invalid credentials"));
    }

    #[test]
    fn only_connection_and_security_properties_are_shared() {
        for key in [
            "security.protocol",
            "sasl.mechanism",
            "ssl.ca.location",
            "socket.timeout.ms",
            "client.dns.lookup",
        ] {
            assert!(is_connection_property(key), "{key} is shared");
        }
        for key in ["auto.offset.reset", "fetch.max.bytes", "linger.ms", "group.id"] {
            assert!(!is_connection_property(key), "{key} is not shared");
        }
    }
}
