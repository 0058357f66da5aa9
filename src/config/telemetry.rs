//! `[telemetry]` configuration (trace export is [`crate::telemetry`]).

use serde::{Deserialize, Serialize};

/// `[telemetry]`: where and how delivery spans are exported.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP endpoint for traces. gRPC: "http://collector:4317"; HTTP: the full URL including
    /// "/v1/traces". Empty: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// if set, else tracing export is off.
    pub otlp_endpoint: String,
    /// "grpc", "http/protobuf" or "http/json". Empty: `OTEL_EXPORTER_OTLP_PROTOCOL`, else "http/protobuf".
    pub protocol: String,
    /// service.name of the spans. `OTEL_SERVICE_NAME` overrides it.
    pub service_name: String,
    /// Fraction of new traces sampled (records without a parent); records with a parent follow
    /// its sampling decision. `OTEL_TRACES_SAMPLER` overrides it.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            protocol: String::new(),
            service_name: "kafka-sidecar".into(),
            sample_ratio: 1.0,
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self, issues: &mut Vec<(String, String)>) {
        let protocols = ["", "grpc", "http/protobuf", "http/json"];
        if !protocols.contains(&self.protocol.as_str()) {
            issues.push((
                "telemetry.protocol".into(),
                "must be \"grpc\", \"http/protobuf\" or \"http/json\"".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            issues.push(("telemetry.sample_ratio".into(), "must be between 0 and 1".into()));
        }
    }
}
