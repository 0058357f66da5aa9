//! Redaction: the one place that decides what is a secret and hides it from every output.
//!
//! Guarantee: a configured secret never reaches a log line, `check-config`, an error message
//! on stderr, `/status` or a metric label. Three layers, each used by every output:
//! - by name: a property, header or key whose name looks secret ([`is_secret_name`]) has its
//!   value shown as `<redacted>`, and so has a librdkafka property librdkafka does not know
//!   (a misspelled `sasl.pasword` is not known to be secret, so it is treated as one);
//! - URLs: the userinfo (`user:password@`) and secret-named query values ([`url`]);
//! - by value: a [`Scrubber`] knows every secret value of the loaded config and replaces it
//!   in any text. The binary installs one ([`install`]) and routes its log writer and its
//!   stderr messages through it, so even text built by libraries (librdkafka's config
//!   errors echo values, reqwest's errors echo URLs) is cleaned before it is written.

use std::borrow::Cow;
use std::io::{self, Write};
use std::sync::OnceLock;

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaConfRes;
use rdkafka::ClientConfig;

use super::Config;

/// What a hidden value is shown as.
pub const REDACTED: &str = "<redacted>";

/// Values shorter than this are not scrubbed from free text: replacing every "ab" in a log
/// line would hide everything else and protect nothing (such a secret is guessable anyway).
/// They are still redacted by name.
pub const MIN_SCRUB_LEN: usize = 4;

/// Name fragments that mark a value as secret (case-insensitive, anywhere in the name).
const SECRET_FRAGMENTS: &[&str] = &[
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "key",
    "credential",
    "auth",
    "cookie",
    "signature",
    "private",
    "jaas",
    "session-id",
];

/// A config key, librdkafka property or HTTP header whose value must not be shown:
/// names containing password, secret, token, key, credential, auth (Authorization), cookie,
/// signature, private or jaas, and every `sasl.*` and `ssl.*password*` property; not
/// `ssl.*.location` (a file path).
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    // A file path (`ssl.key.location`) is not the secret itself, and seeing it helps.
    if n.starts_with("ssl.") && n.ends_with(".location") {
        return false;
    }
    n.starts_with("sasl.")
        || (n.starts_with("ssl.") && n.contains("pas"))
        || SECRET_FRAGMENTS.iter().any(|f| n.contains(f))
}

/// Properties `sasl.*` that name who or how, not the credential itself: shown as
/// `<redacted>` like every `sasl.*` value, but not scrubbed from free text, where their
/// values often equal a group id or topic name ("my-app") that must stay readable.
const IDENTITY_PROPERTIES: &[&str] = &[
    "sasl.username",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.kerberos.service.name",
    "sasl.kerberos.principal",
    "sasl.oauthbearer.client.id",
    "sasl.oauthbearer.method",
];

/// Whether librdkafka knows a property name. Unknown names (typos) may hold a secret, so
/// their values are redacted like secrets.
pub fn is_known_kafka_property(name: &str) -> bool {
    // An empty value may be invalid for the property, but only "unknown" matters here.
    match ClientConfig::new().set(name, "").create_native_config() {
        Err(KafkaError::ClientConfig(RDKafkaConfRes::RD_KAFKA_CONF_UNKNOWN, ..)) => false,
        Err(KafkaError::ClientConfig(..)) | Ok(_) => true,
        // A name with a NUL byte cannot even be passed to librdkafka.
        Err(_) => false,
    }
}

/// A librdkafka property value must be hidden: a secret-looking name or one librdkafka
/// does not know.
pub fn is_secret_property(name: &str) -> bool {
    is_secret_name(name) || !is_known_kafka_property(name)
}

/// The value to show for a librdkafka property.
pub fn property_value(name: &str, value: &str) -> String {
    if is_secret_property(name) {
        REDACTED.into()
    } else {
        value.into()
    }
}

/// The value to show for an HTTP header configured in `app.headers`.
pub fn header_value(name: &str, value: &str) -> String {
    if is_secret_name(name) {
        REDACTED.into()
    } else {
        value.into()
    }
}

/// `url` with its userinfo (`user:password@`) and secret-named query values replaced by
/// `<redacted>`. A user name alone is redacted too (`https://TOKEN@host` is a common way to
/// pass a token). Text that does not parse as a URL but contains `scheme://...@` has
/// everything between `://` and the last `@` hidden.
pub fn url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.has_host() => {
            if u.password().is_some() {
                let _ = u.set_password(Some(REDACTED));
            } else if !u.username().is_empty() {
                let _ = u.set_username(REDACTED);
            }
            redact_query(&mut u);
            // Shown to people, not parsed: "<redacted>" reads better than "%3Credacted%3E".
            u.to_string().replace("%3Credacted%3E", REDACTED)
        }
        _ => redact_userinfo_text(url),
    }
}

fn redact_query(u: &mut reqwest::Url) {
    if !u.query_pairs().any(|(k, _)| is_secret_name(&k)) {
        return;
    }
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .map(|(k, v)| {
            let v = if is_secret_name(&k) {
                REDACTED.into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    u.query_pairs_mut().clear().extend_pairs(pairs);
}

fn redact_userinfo_text(text: &str) -> String {
    let Some(start) = text.find("://").map(|i| i + 3) else {
        return text.to_string();
    };
    let authority_end = text[start..].find(['/', '?', '#']).map_or(text.len(), |i| start + i);
    match text[start..authority_end].rfind('@') {
        Some(at) => format!("{}{REDACTED}{}", &text[..start], &text[start + at..]),
        None => text.to_string(),
    }
}

/// The secret parts of a URL, as they may appear in text: the password and user name, both
/// as written (percent-encoded) and decoded, and secret-named query values.
fn url_secrets(raw: &str, out: &mut Vec<String>) {
    let Ok(u) = reqwest::Url::parse(raw) else {
        // Unparseable: hide the whole userinfo, if there is one.
        if let Some(start) = raw.find("://").map(|i| i + 3) {
            let end = raw[start..].find(['/', '?', '#']).map_or(raw.len(), |i| start + i);
            if let Some(at) = raw[start..end].rfind('@') {
                let info = &raw[start..start + at];
                out.push(info.to_string());
                out.extend(info.split(':').map(str::to_string));
            }
        }
        return;
    };
    let mut push = |s: &str| {
        out.push(s.to_string());
        if let Ok(decoded) = percent_decode(s) {
            out.push(decoded);
        }
    };
    if let Some(p) = u.password() {
        push(p);
    } else if !u.username().is_empty() {
        push(u.username());
    }
    if u.password().is_some() || !u.username().is_empty() {
        // HTTP clients send the userinfo as `Authorization: Basic base64(user:password)`.
        use base64::Engine as _;
        let decode = |s: &str| percent_decode(s).unwrap_or_else(|()| s.to_string());
        let pair = format!("{}:{}", decode(u.username()), decode(u.password().unwrap_or_default()));
        out.push(base64::engine::general_purpose::STANDARD.encode(pair));
    }
    for (k, v) in u.query_pairs() {
        if is_secret_name(&k) {
            out.push(v.into_owned());
        }
    }
}

fn percent_decode(s: &str) -> Result<String, ()> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// The secret values of `OTEL_EXPORTER_OTLP_[TRACES_]HEADERS` (`k=v,k2=v2`): every value,
/// since these headers exist to carry credentials.
fn otel_header_secrets(env: &str, out: &mut Vec<String>) {
    for pair in env.split(',') {
        if let Some((_, v)) = pair.split_once('=') {
            let v = v.trim();
            out.push(v.to_string());
            if let Ok(d) = percent_decode(v) {
                out.push(d);
            }
        }
    }
}

/// Replaces known secret values in free text.
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    /// Longest first, so a secret containing another is replaced whole.
    secrets: Vec<String>,
}

impl Scrubber {
    /// Every secret value of `cfg`, and of the OTLP header variables in the environment.
    pub fn from_config(cfg: &Config) -> Self {
        let mut s = Vec::new();
        for (name, value) in cfg.kafka.properties.iter().chain(&cfg.dlq.properties) {
            if is_secret_property(name) && !IDENTITY_PROPERTIES.contains(&name.to_ascii_lowercase().as_str()) {
                s.push(value.clone());
            }
        }
        for (name, value) in &cfg.app.headers {
            if is_secret_name(name) {
                s.push(value.clone());
                // "Bearer abc": the token may be logged without its scheme.
                s.extend(value.split_whitespace().skip(1).map(str::to_string));
            }
        }
        let urls = [
            &cfg.app.url,
            &cfg.app.health_url,
            &cfg.telemetry.otlp_endpoint,
            &cfg.dedup.redis_url,
        ];
        for u in urls.into_iter().chain(&cfg.dedup.cluster_urls) {
            url_secrets(u, &mut s);
        }
        for var in ["OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"] {
            if let Ok(v) = std::env::var(var) {
                otel_header_secrets(&v, &mut s);
            }
        }
        Self::new(s)
    }

    /// A scrubber for these values (those shorter than [`MIN_SCRUB_LEN`] are ignored), as
    /// written and as escaped in JSON logs and `{:?}` fields (`"` → `\"`, `\` → `\\`).
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .filter(|s| s.chars().count() >= MIN_SCRUB_LEN && s != REDACTED)
            .flat_map(|s| {
                let debug = s.escape_debug().to_string();
                let json = serde_json::to_string(&s).unwrap_or_default();
                let json = json.trim_matches('"').to_string();
                [s, debug, json]
            })
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self { secrets }
    }

    /// `text` with every known secret replaced by `<redacted>`.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = Cow::Owned(out.replace(s.as_str(), REDACTED));
            }
        }
        out
    }
}

static INSTALLED: OnceLock<Scrubber> = OnceLock::new();

/// Makes `cfg`'s secrets known to [`scrub`] and [`StderrWriter`] for the rest of the process.
/// The first call wins.
pub fn install(cfg: &Config) {
    let _ = INSTALLED.set(Scrubber::from_config(cfg));
}

/// `text` with the installed config's secrets replaced (unchanged if none is installed).
pub fn scrub(text: &str) -> Cow<'_, str> {
    match INSTALLED.get() {
        Some(s) => s.scrub(text),
        None => Cow::Borrowed(text),
    }
}

/// A librdkafka client-creation error as text without any property value: a config error
/// names the property (its value is never shown) and the rest goes through [`scrub`].
/// `section` is where the properties come from, e.g. "kafka.properties".
pub fn kafka_error(e: &KafkaError, section: &str) -> String {
    let text = match e {
        KafkaError::ClientConfig(_, _, key, _) => format!("{section}.{key}: {}", kafka_config_reason(e)),
        other => other.to_string(),
    };
    scrub(&text).into_owned()
}

/// librdkafka's description of why a property was refused, with the value removed (its
/// own message quotes it: `Invalid value "..." for configuration property "..."`).
pub fn kafka_config_reason(e: &KafkaError) -> String {
    let KafkaError::ClientConfig(_, desc, _, value) = e else {
        return scrub(&e.to_string()).into_owned();
    };
    let mut desc = desc.clone();
    if !value.is_empty() {
        desc = desc.replace(&format!("\"{value}\""), &format!("\"{REDACTED}\""));
    }
    if value.len() >= MIN_SCRUB_LEN {
        desc = desc.replace(value.as_str(), REDACTED);
    }
    let desc = desc.trim_end_matches('.');
    let mut reason = desc.get(..1).map(str::to_ascii_lowercase).unwrap_or_default();
    reason.push_str(desc.get(1..).unwrap_or_default());
    scrub(&reason).into_owned()
}

/// A figment error reason for `key`, with quoted values removed when the key may hold a
/// secret (serde's messages quote what they found: `found string "..."`).
pub fn config_reason(key: &str, reason: String) -> String {
    let k = key.to_ascii_lowercase();
    // The config keys that may hold a secret: free-form maps and URLs. (Other keys with
    // "key" in their name, like `dedup.key` or `rate_limit.per_key_burst`, hold none.)
    let sensitive = k.contains(".properties")
        || k.contains(".headers")
        || k.ends_with("url")
        || k.ends_with("urls")
        || k.contains("urls[")
        || k.ends_with("endpoint");
    if !sensitive {
        return reason;
    }
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason.as_str();
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest.as_bytes()[open] as char;
        out.push_str(&rest[..=open]);
        match rest[open + 1..].find(quote) {
            Some(close) => {
                out.push_str(REDACTED);
                out.push(quote);
                rest = &rest[open + 1 + close + 1..];
            }
            None => {
                out.push_str(REDACTED);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The log writer of the binary: stderr, with [`scrub`] applied to every line. The
/// `tracing` formatter writes each event with one `write_all`, so a secret is never split
/// across two calls.
pub struct StderrWriter;

impl Write for StderrWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for StderrWriter {
    type Writer = StderrWriter;

    fn make_writer(&'a self) -> Self::Writer {
        StderrWriter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_recognised_by_pattern() {
        for name in [
            "sasl.password",
            "sasl.pasword",
            "sasl.username",
            "sasl.jaas.config",
            "sasl.oauthbearer.client.secret",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "ssl.truststore.pasword",
            "Authorization",
            "X-Api-Key",
            "x-auth-token",
            "Cookie",
            "client_credentials",
        ] {
            assert!(is_secret_name(name), "{name}");
        }
        for name in [
            "ssl.key.location",
            "bootstrap.servers",
            "security.protocol",
            "fetch.max.bytes",
            "Content-Type",
            "X-Tenant",
        ] {
            assert!(!is_secret_name(name), "{name}");
        }
    }

    #[test]
    fn unknown_kafka_properties_count_as_secret_and_known_ones_do_not() {
        assert!(is_known_kafka_property("fetch.max.bytes"));
        assert!(is_known_kafka_property("security.protocol"));
        assert!(!is_known_kafka_property("fetch.max.bites"));
        assert!(is_secret_property("fetch.max.bites"), "a typo may hold a secret");
        assert!(!is_secret_property("fetch.max.bytes"));
        assert_eq!(property_value("retries.typo", "hunter22"), REDACTED);
        assert_eq!(property_value("fetch.max.bytes", "1024"), "1024");
    }

    #[test]
    fn urls_lose_userinfo_and_secret_query_values() {
        assert_eq!(url("redis://u:secret@h:6379/0"), "redis://u:<redacted>@h:6379/0");
        assert_eq!(url("http://h/"), "http://h/");
        assert!(!url("https://tok3n@h/x").contains("tok3n"));
        let q = url("http://h/p?tenant=a&access_token=s3cr3t");
        assert!(!q.contains("s3cr3t") && q.contains("tenant=a"), "{q}");
        assert_eq!(url("not a url://user:pw@h x"), "not a url://<redacted>@h x");
        assert_eq!(url(""), "");
    }

    #[test]
    fn the_scrubber_hides_every_secret_of_a_config_in_any_text() {
        let mut cfg = Config::default();
        cfg.kafka.properties.insert("sasl.password".into(), "p4ssw0rd".into());
        cfg.kafka.properties.insert("sasl.pasword".into(), "typo-secret".into());
        cfg.kafka.properties.insert("fetch.max.bytes".into(), "1048576".into());
        cfg.kafka.properties.insert("sasl.username".into(), "my-app".into());
        cfg.dlq.properties.insert("ssl.key.password".into(), "keypass".into());
        cfg.app.url = "http://app-user:app%40pw@127.0.0.1/".into();
        cfg.app.health_url = "http://h:health-pw@127.0.0.1/health".into();
        cfg.app.headers.insert("Authorization".into(), "Bearer tok-123".into());
        cfg.dedup.redis_url = "redis://:redis-pw@127.0.0.1:6379/0".into();
        let s = Scrubber::from_config(&cfg);
        // "YXBwLXVzZXI6YXBwQHB3" is base64("app-user:app@pw"), the Basic auth of app.url.
        let text = "p4ssw0rd typo-secret keypass app@pw app%40pw health-pw tok-123 redis-pw YXBwLXVzZXI6YXBwQHB3 offset 1048576";
        let out = s.scrub(text);
        for secret in [
            "p4ssw0rd",
            "typo-secret",
            "keypass",
            "app@pw",
            "app%40pw",
            "health-pw",
            "tok-123",
            "redis-pw",
            "YXBwLXVzZXI6YXBwQHB3",
        ] {
            assert!(!out.contains(secret), "{secret} in {out}");
        }
        assert!(out.contains("offset 1048576"), "non-secret values stay: {out}");
        assert_eq!(
            s.scrub("group my-app"),
            "group my-app",
            "a user name is not scrubbed from text"
        );
        let quoted = Scrubber::new(["pa\"ss\\word".to_string()]);
        assert_eq!(quoted.scrub(r#"{"error":"pa\"ss\\word"}"#), r#"{"error":"<redacted>"}"#);
        assert_eq!(quoted.scrub("pa\"ss\\word"), "<redacted>");
    }

    #[test]
    fn config_errors_of_urls_and_maps_do_not_quote_values_and_others_do() {
        let r = config_reason("kafka.properties", "found string \"a=hunter22\", expected a map".into());
        assert_eq!(r, "found string \"<redacted>\", expected a map");
        let r = config_reason("dedup.cluster_urls[0]", "bad `redis://:pw@h`".into());
        assert_eq!(r, "bad `<redacted>`");
        let r = config_reason("app.mode", "unknown variant `sngle`".into());
        assert_eq!(r, "unknown variant `sngle`", "a typo in a plain key stays visible");
    }

    #[test]
    fn kafka_config_errors_never_show_the_value() {
        let e = ClientConfig::new()
            .set("sasl.pasword", "hunter22")
            .create_native_config()
            .err()
            .expect("librdkafka rejects an unknown property");
        let shown = kafka_error(&e, "kafka.properties");
        assert!(!shown.contains("hunter22"), "{shown}");
        assert!(shown.contains("kafka.properties.sasl.pasword"), "{shown}");
        let e = ClientConfig::new()
            .set("session.timeout.ms", "abcdefg")
            .create_native_config()
            .err()
            .expect("librdkafka rejects a bad value");
        assert!(!kafka_error(&e, "kafka.properties").contains("abcdefg"));
    }
}
