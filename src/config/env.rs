//! Environment overrides: `KAFKA_SIDECAR_<SECTION>__<KEY>=value` as nested config values.
//!
//! Guarantee: a value meant for a string field stays the exact string given
//! (`KAFKA_SIDECAR_KAFKA__GROUP_ID=007` is the group "007", not 7), while numbers, booleans
//! and lists still parse for the fields that take them. The type is read from the default
//! config: a field whose default is a string (text, duration, enum) gets the raw text, a
//! list field gets a parsed `[...]` or else the raw text (a comma-separated list), anything
//! else is parsed like a TOML value. librdkafka properties (`kafka.properties`,
//! `dlq.properties`) and `app.headers` are free-form maps of strings; in property names `_`
//! stands for `.` (`..._KAFKA__PROPERTIES__SASL_PASSWORD` → `sasl.password`).

use figment::value::{Dict, Value};

use super::{Config, ConfigIssue, ENV_PREFIX};

/// Sections whose `properties` map holds librdkafka property names.
const PROPERTY_SECTIONS: &[&str] = &["kafka", "dlq"];

/// The `KAFKA_SIDECAR_*` variables of `env` as a nested dictionary of config values; a
/// variable with an empty part (`KAFKA_SIDECAR_APP____URL`) is an issue naming it.
pub(super) fn env_dict(env: &[(String, String)], issues: &mut Vec<ConfigIssue>) -> Dict {
    let defaults = toml::Value::try_from(Config::default()).unwrap_or(toml::Value::Table(Default::default()));
    let mut root = Dict::new();
    for (key, raw) in env {
        let Some(rest) = key.strip_prefix(ENV_PREFIX).filter(|r| r.contains("__")) else {
            continue;
        };
        let path = env_path(rest);
        if path.iter().any(String::is_empty) {
            issues.push(ConfigIssue {
                key: key.clone(),
                reason: "is not a config key: expected KAFKA_SIDECAR_<SECTION>__<KEY>".into(),
            });
            continue;
        }
        let value = typed_value(&defaults, &path, raw);
        insert_path(&mut root, &path, value);
    }
    root
}

/// `KAFKA__PROPERTIES__SASL_PASSWORD` → `["kafka", "properties", "sasl.password"]`.
fn env_path(rest: &str) -> Vec<String> {
    for section in PROPERTY_SECTIONS {
        let prefix = format!("{}__PROPERTIES__", section.to_ascii_uppercase());
        if let Some(name) = rest.strip_prefix(&prefix) {
            let name = name.to_ascii_lowercase().replace('_', ".");
            return vec![section.to_string(), "properties".into(), name];
        }
    }
    rest.split("__").map(str::to_ascii_lowercase).collect()
}

/// The raw text typed for the field at `path` (see the module doc).
fn typed_value(defaults: &toml::Value, path: &[String], raw: &str) -> Value {
    match default_at(defaults, path) {
        Field::Text => Value::from(raw.to_string()),
        Field::List if !raw.trim_start().starts_with('[') => Value::from(raw.to_string()),
        Field::List | Field::Other => parse(raw),
    }
}

enum Field {
    /// A string field, or an entry of a free-form string map.
    Text,
    /// A list field.
    List,
    /// A number, boolean, table or unknown key.
    Other,
}

fn default_at(defaults: &toml::Value, path: &[String]) -> Field {
    let mut node = defaults;
    for (i, part) in path.iter().enumerate() {
        match node.get(part) {
            Some(child) => node = child,
            // An entry of a free-form map: the map's own key is the one before.
            None if i + 1 == path.len() && i > 0 && is_string_map(&path[i - 1]) => return Field::Text,
            None => return Field::Other,
        }
    }
    match node {
        toml::Value::String(_) => Field::Text,
        toml::Value::Array(_) => Field::List,
        _ => Field::Other,
    }
}

fn is_string_map(key: &str) -> bool {
    matches!(key, "properties" | "headers")
}

/// A number or boolean (`7`, `012`, `0.5`, `true`), else a TOML value (`[400, 422]`), else
/// the text itself. figment's own value parser is not used: it panics on some non-ASCII text.
fn parse(raw: &str) -> Value {
    let t = raw.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Value::from(n);
    }
    if let Ok(n) = t.parse::<i64>() {
        return Value::from(n);
    }
    if let Ok(b) = t.parse::<bool>() {
        return Value::from(b);
    }
    if let Ok(f) = t.parse::<f64>() {
        return Value::from(f);
    }
    toml::from_str::<toml::Table>(&format!("v = {t}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .and_then(|v| Value::serialize(v).ok())
        .unwrap_or_else(|| Value::from(raw.to_string()))
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    let [first, rest @ ..] = path else { return };
    if rest.is_empty() {
        dict.insert(first.clone(), value);
        return;
    }
    let child = dict.entry(first.clone()).or_insert_with(|| Value::from(Dict::new()));
    if let Value::Dict(_, d) = child {
        insert_path(d, rest, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(pairs: &[(&str, &str)]) -> Dict {
        let env: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut issues = Vec::new();
        let d = env_dict(&env, &mut issues);
        assert!(issues.is_empty(), "{issues:?}");
        d
    }

    fn at<'a>(d: &'a Dict, path: &[&str]) -> &'a Value {
        let mut v = d.get(path[0]).expect(path[0]);
        for p in &path[1..] {
            v = v.as_dict().and_then(|d| d.get(*p)).expect(p);
        }
        v
    }

    #[test]
    fn string_fields_keep_the_exact_text() {
        let d = dict(&[
            ("KAFKA_SIDECAR_KAFKA__GROUP_ID", "007"),
            ("KAFKA_SIDECAR_KAFKA__CLIENT_ID", "true"),
            ("KAFKA_SIDECAR_DEDUP__PREFIX", "1e3"),
            ("KAFKA_SIDECAR_APP__TIMEOUT", "10s"),
        ]);
        assert_eq!(at(&d, &["kafka", "group_id"]).as_str(), Some("007"));
        assert_eq!(at(&d, &["kafka", "client_id"]).as_str(), Some("true"));
        assert_eq!(at(&d, &["dedup", "prefix"]).as_str(), Some("1e3"));
        assert_eq!(at(&d, &["app", "timeout"]).as_str(), Some("10s"));
    }

    #[test]
    fn lists_parse_from_brackets_and_stay_text_otherwise() {
        let d = dict(&[
            ("KAFKA_SIDECAR_RETRY__NON_RETRYABLE_STATUSES", "[400, 409]"),
            ("KAFKA_SIDECAR_KAFKA__TOPICS", "007,008"),
        ]);
        assert!(at(&d, &["retry", "non_retryable_statuses"]).as_array().is_some());
        assert_eq!(at(&d, &["kafka", "topics"]).as_str(), Some("007,008"));
    }

    #[test]
    fn numbers_and_booleans_still_parse() {
        let d = dict(&[
            ("KAFKA_SIDECAR_PIPELINE__WORKERS", "7"),
            ("KAFKA_SIDECAR_DEDUP__ENABLED", "true"),
            ("KAFKA_SIDECAR_TELEMETRY__SAMPLE_RATIO", "0.25"),
        ]);
        assert_eq!(at(&d, &["pipeline", "workers"]).to_u128(), Some(7));
        assert_eq!(at(&d, &["dedup", "enabled"]).to_bool(), Some(true));
        assert_eq!(at(&d, &["telemetry", "sample_ratio"]).to_f64(), Some(0.25));
    }

    #[test]
    fn kafka_and_dlq_property_names_map_underscores_to_dots_and_stay_strings() {
        let d = dict(&[
            ("KAFKA_SIDECAR_KAFKA__PROPERTIES__SASL_PASSWORD", "0123"),
            ("KAFKA_SIDECAR_DLQ__PROPERTIES__COMPRESSION_TYPE", "zstd"),
            ("KAFKA_SIDECAR_DLQ__PROPERTIES__LINGER_MS", "007"),
            ("KAFKA_SIDECAR_APP__HEADERS__X_TENANT", "042"),
        ]);
        assert_eq!(at(&d, &["kafka", "properties", "sasl.password"]).as_str(), Some("0123"));
        assert_eq!(
            at(&d, &["dlq", "properties", "compression.type"]).as_str(),
            Some("zstd")
        );
        assert_eq!(at(&d, &["dlq", "properties", "linger.ms"]).as_str(), Some("007"));
        assert_eq!(at(&d, &["app", "headers", "x_tenant"]).as_str(), Some("042"));
    }

    #[test]
    fn a_variable_with_an_empty_part_is_an_issue_naming_it() {
        let mut issues = Vec::new();
        let env = [("KAFKA_SIDECAR_APP____URL".to_string(), "x".to_string())];
        assert!(env_dict(&env, &mut issues).is_empty());
        assert_eq!(issues[0].key, "KAFKA_SIDECAR_APP____URL");
    }

    #[test]
    fn odd_text_for_a_number_field_never_panics_and_stays_text() {
        let d = dict(&[("KAFKA_SIDECAR_PIPELINE__WORKERS", "\"\u{1e290}\u{1d2e0}aA0\\0\"")]);
        assert!(at(&d, &["pipeline", "workers"]).as_str().is_some());
        let d = dict(&[("KAFKA_SIDECAR_A__A", "{ x = 1 }")]);
        assert!(at(&d, &["a", "a"]).as_dict().is_some());
    }

    #[test]
    fn other_variables_are_ignored() {
        let d = dict(&[
            ("KAFKA_SIDECAR_CONFIG", "/x"),
            ("PATH", "/bin"),
            ("KAFKA_SIDECAR_", "x"),
        ]);
        assert!(d.is_empty(), "{d:?}");
    }
}
