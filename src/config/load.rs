//! Loading: the figment plumbing that layers built-in defaults, the TOML file and the
//! environment ([`super::env`]), extracts each section on its own so that every problem is
//! reported with its full key, and then runs [`Config::validate`](super::Config).

use std::path::Path;

use figment::providers::{Format, Serialized, Toml};
use figment::{Figment, Provider};
use serde::de::DeserializeOwned;

use super::{env, redact, Config, ConfigError, ConfigIssue};

impl Config {
    /// Loads defaults, then the TOML file (if any), then `KAFKA_SIDECAR_*` environment variables,
    /// and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (tests use this).
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path.map(std::fs::read_to_string) {
            None => None,
            Some(Ok(text)) => Some(text),
            Some(Err(e)) => {
                // Without the file every required key would be reported missing too: noise.
                return Err(ConfigError(vec![ConfigIssue {
                    key: "--config".into(),
                    reason: format!("cannot read {}: {e}", path.unwrap_or(Path::new("")).display()),
                }]));
            }
        };
        Self::load_text(text.as_deref(), env)
    }

    /// Like [`Config::load_with_env`] with the file's text (`None`: no file).
    pub fn load_text(
        toml_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(text) = toml_text {
            if let Some(issue) = toml_syntax_error(text) {
                return Err(ConfigError(vec![issue]));
            }
            figment = figment.merge(Toml::string(text));
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut issues = Vec::new();
        figment = figment.merge(Serialized::defaults(env::env_dict(&env, &mut issues)));

        let config = extract_sections(&figment, &mut issues);
        if let Some(config) = &config {
            config.validate(&mut issues);
        }
        match config {
            Some(config) if issues.is_empty() => Ok(config),
            _ => Err(ConfigError(issues)),
        }
    }
}

/// A TOML syntax error as an issue with its line and column. The parser's own message
/// quotes the offending line, which may hold a secret, so only its description is kept.
fn toml_syntax_error(text: &str) -> Option<ConfigIssue> {
    let e = text.parse::<toml::Table>().err()?;
    let at = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {column}")
        }
        None => String::new(),
    };
    Some(ConfigIssue {
        key: "config file".into(),
        reason: format!("is not valid TOML{at}: {}", e.message().trim_end()),
    })
}

/// Extracts each section on its own so that errors in several sections are all reported.
fn extract_sections(figment: &Figment, issues: &mut Vec<ConfigIssue>) -> Option<Config> {
    // The sections are the top-level keys of the default config: no list to keep in sync.
    let sections: Vec<String> = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t.keys().cloned().collect(),
        _ => Vec::new(),
    };
    match figment.data() {
        Ok(data) => {
            for dict in data.values() {
                for key in dict.keys().filter(|k| !sections.contains(k)) {
                    issues.push(ConfigIssue {
                        key: key.clone(),
                        reason: format!("unknown section (expected one of: {})", sections.join(", ")),
                    });
                }
            }
        }
        Err(e) => {
            push_figment_errors(e, "", issues);
            return None;
        }
    }
    let before = issues.len();
    let config = Config {
        kafka: section(figment, "kafka", issues),
        app: section(figment, "app", issues),
        pipeline: section(figment, "pipeline", issues),
        batch: section(figment, "batch", issues),
        retry: section(figment, "retry", issues),
        dlq: section(figment, "dlq", issues),
        retry_topics: section(figment, "retry_topics", issues),
        shutdown: section(figment, "shutdown", issues),
        admin: section(figment, "admin", issues),
        log: section(figment, "log", issues),
        telemetry: section(figment, "telemetry", issues),
        rate_limit: section(figment, "rate_limit", issues),
        breaker: section(figment, "breaker", issues),
        dedup: section(figment, "dedup", issues),
    };
    (issues.len() == before).then_some(config)
}

fn section<T: DeserializeOwned + Default>(figment: &Figment, name: &str, issues: &mut Vec<ConfigIssue>) -> T {
    figment.extract_inner(name).unwrap_or_else(|e| {
        push_figment_errors(e, name, issues);
        T::default()
    })
}

fn push_figment_errors(error: figment::Error, section: &str, issues: &mut Vec<ConfigIssue>) {
    for e in error {
        // figment lists the path innermost first.
        let mut path: Vec<String> = e.path.iter().rev().cloned().collect();
        if !section.is_empty() && path.first().map(String::as_str) != Some(section) {
            path.insert(0, section.to_string());
        }
        let reason = match &e.kind {
            figment::error::Kind::UnknownField(field, expected) => {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
                format!("unknown key (expected one of: {})", expected.join(", "))
            }
            kind => kind.to_string(),
        };
        let key = if path.is_empty() {
            "config file".to_string()
        } else {
            path.join(".")
        };
        let reason = redact::config_reason(&key, reason);
        issues.push(ConfigIssue { key, reason });
    }
}
