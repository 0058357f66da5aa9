//! Property tests: loading any TOML text with any environment never panics, and a config
//! that does not load is reported as issues that each name a key.

use proptest::prelude::*;

use super::{Config, ConfigError, ENV_PREFIX};

/// `section.key` for every key of the default config, plus free-form map entries.
fn known_keys() -> Vec<String> {
    let defaults = toml::Value::try_from(Config::default()).unwrap();
    let mut keys = Vec::new();
    for (section, table) in defaults.as_table().unwrap() {
        for key in table.as_table().unwrap().keys() {
            keys.push(format!("{section}.{key}"));
        }
    }
    keys.extend(
        [
            "kafka.properties.sasl.password",
            "kafka.properties.fetch.max.bytes",
            "kafka.properties.sasl.pasword",
            "dlq.properties.linger.ms",
            "app.headers.Authorization",
            "bogus.key",
        ]
        .map(String::from),
    );
    keys
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(known_keys()),
        1 => "[a-z_]{1,8}\\.[a-z_.]{1,12}",
    ]
}

/// A TOML value: scalars of every type, durations (some absurd), URLs with passwords, lists.
fn value() -> impl Strategy<Value = toml::Value> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        any::<bool>().prop_map(toml::Value::Boolean),
        "\\PC{0,24}".prop_map(toml::Value::String),
        "[0-9]{1,22} ?(ns|ms|s|m|h|d|w|years|y|parsecs)".prop_map(toml::Value::String),
        "(http|redis|rediss)://[a-z]{0,4}:[a-z0-9%@]{0,6}@[a-z]{1,5}:[0-9]{1,6}/?".prop_map(toml::Value::String),
        "[0-9]{1,12} ?(B|KiB|MiB|GiB|TB)".prop_map(toml::Value::String),
        proptest::sample::select(vec!["single", "batch", "key", "partition", "json", "pause", "offset"])
            .prop_map(|s| toml::Value::String(s.into())),
    ];
    scalar.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            proptest::collection::btree_map("[a-z.]{1,8}", inner, 0..3)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// A config file made of `[section]` tables (a key's path before its last part is its table).
fn toml_text() -> impl Strategy<Value = String> {
    let entries = proptest::collection::vec((key(), value()), 0..12).prop_map(|entries| {
        let mut text = String::new();
        for (key, value) in entries {
            let (table, leaf) = split_key(&key);
            let value = toml::to_string(&toml::toml! { v = value }).unwrap_or_default();
            let value = value.trim_start_matches("v = ").trim_end();
            text.push_str(&format!("[{table}]\n\"{leaf}\" = {value}\n"));
        }
        text
    });
    prop_oneof![4 => entries, 1 => "\\PC{0,200}"]
}

/// `kafka.properties.sasl.password` → (`kafka.properties`, `sasl.password`).
fn split_key(key: &str) -> (String, String) {
    for map in [".properties.", ".headers."] {
        if let Some(i) = key.find(map) {
            let cut = i + map.len() - 1;
            return (key[..cut].to_string(), key[cut + 1..].to_string());
        }
    }
    let (table, leaf) = key.rsplit_once('.').unwrap_or(("x", key));
    (table.to_string(), leaf.to_string())
}

fn env() -> impl Strategy<Value = Vec<(String, String)>> {
    let pair = (key(), "\\PC{0,30}").prop_map(|(key, value)| {
        let (table, leaf) = split_key(&key);
        let name = format!("{table}__{}", leaf.replace('.', "_")).replace('.', "__");
        (format!("{ENV_PREFIX}{}", name.to_ascii_uppercase()), value)
    });
    proptest::collection::vec(pair, 0..6)
}

fn check_issues(e: &ConfigError, text: &str, env: &[(String, String)]) -> Result<(), TestCaseError> {
    let sections = toml::Value::try_from(Config::default()).unwrap();
    prop_assert!(!e.0.is_empty());
    for issue in &e.0 {
        prop_assert!(!issue.reason.trim().is_empty(), "{issue:?}");
        let first = issue.key.split(['.', '[']).next().unwrap_or_default();
        let named = issue.key == "config file"
            || sections.get(first).is_some()
            || text.contains(first)
            || env.iter().any(|(k, _)| k.contains(&first.to_ascii_uppercase()));
        prop_assert!(!first.is_empty() && named, "issue does not name a key: {issue:?}");
    }
    Ok(())
}

proptest! {
    // 256 cases keep CI fast; PROPTEST_CASES=N runs a longer search.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn loading_any_toml_and_env_never_panics_and_names_the_key_of_every_problem(
        text in toml_text(),
        env in env(),
    ) {
        match Config::load_text(Some(&text), env.clone()) {
            Ok(cfg) => {
                // A loaded config is usable: it renders, and its durations are bounded.
                prop_assert!(!cfg.redacted_toml().is_empty());
                prop_assert!(cfg.shutdown.grace_period <= super::duration::MAX);
            }
            Err(e) => check_issues(&e, &text, &env)?,
        }
    }

    #[test]
    fn a_valid_base_with_any_env_overrides_loads_or_names_keys(env in env()) {
        let base = "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\ntopics = [\"t\"]\n[app]\nurl = \"http://a/\"\n";
        if let Err(e) = Config::load_text(Some(base), env.clone()) {
            check_issues(&e, base, &env)?;
        }
    }
}
