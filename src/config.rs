//! Typed settings: built-in defaults, then a TOML file, then the environment.
//!
//! Loading never stops at the first problem: [`Settings::load`] collects every
//! bad or unknown key and reports them together in one [`ConfigError`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::db::DatabaseUrl;

/// Prefix of every environment variable the relay reads (besides `RUST_LOG`).
pub const ENV_PREFIX: &str = "OUTBOX";
/// Environment variable naming the TOML file, when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "OUTBOX_CONFIG";

/// Producer properties the record contract fixes; `[kafka.properties]` may
/// repeat them with the same value but never change them.
const FIXED_KAFKA_PROPERTIES: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("partitioner", "murmur2_random"),
];

/// All of the relay's settings.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Database URL shared by every source that names none of its own (`OUTBOX_DATABASE_URL`).
    pub database_url: Option<DatabaseUrl>,
    /// Rows claimed per batch (`OUTBOX_BATCH_SIZE`).
    pub batch_size: usize,
    /// Delivered rows deleted per statement (`OUTBOX_DELETE_BATCH_SIZE`).
    pub delete_batch_size: usize,
    /// Batches of one source handed to the producer and not yet acknowledged, at most
    /// (`OUTBOX_IN_FLIGHT_BATCHES`); beyond that, smaller batches still go out while the
    /// rows out stay within `in_flight_batches * batch_size`. 1 sends a batch only after
    /// the previous one's outcome is known.
    pub in_flight_batches: usize,
    /// How long an idle source waits before polling again, unless woken by a new row
    /// (`OUTBOX_PROCESS_INTERVAL`; a bare number is seconds).
    #[serde(with = "humantime_serde_compat")]
    pub process_interval: Duration,
    /// Default attempts before an event is dead-lettered; a row's own `max_retries` wins
    /// (`OUTBOX_MAX_RETRIES`).
    pub max_retries: i32,
    /// Capacity of each source's dead-letter table (`OUTBOX_DEAD_LETTER_SIZE`).
    pub dead_letter_size: i64,
    /// Deadline of every PostgreSQL and Kafka operation, and of the shutdown drain
    /// (`OUTBOX_OPERATION_TIMEOUT`).
    #[serde(with = "humantime_serde_compat")]
    pub operation_timeout: Duration,
    /// When false the process and its endpoints run but nothing is published (`OUTBOX_ENABLED`).
    pub enabled: bool,
    /// Retry and dead-letter behaviour (`[retry]`).
    pub retry: RetrySettings,
    /// The Kafka producer (`[kafka]`).
    pub kafka: KafkaSettings,
    /// The HTTP server (`[http]`).
    pub http: HttpSettings,
    /// Health thresholds (`[health]`).
    pub health: HealthSettings,
    /// Logging (`[log]`).
    pub log: LogSettings,
    /// The outbox tables to relay (`[[sources]]`).
    pub sources: Vec<SourceSettings>,
}

/// Retry and dead-letter behaviour.
#[derive(Debug, Clone, Serialize)]
pub struct RetrySettings {
    /// First retry delay of a failed event; doubles per attempt, with jitter.
    #[serde(with = "humantime_serde_compat")]
    pub backoff_base: Duration,
    /// Longest delay between two attempts of one event. (During a broker or database
    /// outage a source retries at least every 5 seconds, whatever this says.)
    #[serde(with = "humantime_serde_compat")]
    pub backoff_max: Duration,
    /// What happens to an aggregate's later events once one of its events is dead-lettered.
    pub after_dead_letter: AfterDeadLetter,
}

/// What happens to an aggregate's later events once one of them is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterDeadLetter {
    /// Later events of the aggregate keep flowing (the dead-lettered one is skipped).
    Continue,
    /// Later events of the aggregate wait until the dead-lettered one is replayed or purged.
    Block,
}

/// The Kafka producer.
#[derive(Debug, Clone, Serialize)]
pub struct KafkaSettings {
    /// Bootstrap brokers, comma-separated `host:port` (`OUTBOX_KAFKA__BROKERS`).
    pub brokers: String,
    /// librdkafka properties passed through (TLS, SASL, compression, linger).
    /// From the environment, `OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`.
    #[serde(serialize_with = "serialize_redacted_properties")]
    pub properties: BTreeMap<String, String>,
}

/// The HTTP server.
#[derive(Debug, Clone, Serialize)]
pub struct HttpSettings {
    /// Address of `/health`, `/health/deep` and `/metrics` (`OUTBOX_HTTP__LISTEN`).
    pub listen: SocketAddr,
}

/// Health thresholds.
#[derive(Debug, Clone, Serialize)]
pub struct HealthSettings {
    /// Age of the oldest pending event above which a source's lag check is degraded.
    #[serde(with = "humantime_serde_compat")]
    pub lag_threshold: Duration,
    /// How often pending counts, lag and dead-letter fill are refreshed.
    #[serde(with = "humantime_serde_compat")]
    pub refresh_interval: Duration,
}

/// Logging.
#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    /// Filter directives, used when `RUST_LOG` is unset (`OUTBOX_LOG__LEVEL`).
    pub level: String,
    /// `auto` (JSON unless stdout is a terminal), `json` or `text` (`OUTBOX_LOG__FORMAT`).
    pub format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// JSON lines when stdout is not a terminal, readable text when it is.
    Auto,
    /// JSON lines.
    Json,
    /// Readable text.
    Text,
}

/// One outbox table to relay.
#[derive(Debug, Clone, Serialize)]
pub struct SourceSettings {
    /// Name used in logs, metrics, headers and the CLI.
    pub name: String,
    /// The source's database; when absent, `database_url_env` or the top-level `database_url`.
    pub database_url: DatabaseUrl,
    /// Schema holding `outbox` and `outbox_dead_letter` (a plain lowercase identifier).
    pub schema: String,
    /// Topic for rows that name none.
    pub topic: String,
}

impl Settings {
    /// Loads the layered configuration from the real environment and an optional file
    /// (`--config`, else `OUTBOX_CONFIG`).
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let path = path.map(Path::to_path_buf).or_else(|| {
            env.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(CONFIG_PATH_ENV))
                .map(|(_, v)| v.into())
        });
        let file = match path {
            Some(p) => Some(std::fs::read_to_string(&p).map_err(|e| {
                ConfigError(vec![format!(
                    "cannot read config file {}: {e}",
                    p.display()
                )])
            })?),
            None => None,
        };
        Settings::from_parts(file.as_deref(), &env)
    }

    /// Builds settings from TOML text and an environment map; what tests and `load` share.
    pub fn from_parts(
        toml: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(text) = toml {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        // Names match case-insensitively, so a ConfigMap can use the platform plan's
        // lowercase keys (outbox_batch_size) as environment variables directly.
        let mut relay_env: config::Map<String, String> = config::Map::new();
        let mut twice = Vec::new();
        for (k, v) in env {
            let upper = k.to_ascii_uppercase();
            if !upper.starts_with("OUTBOX_") || upper == CONFIG_PATH_ENV {
                continue;
            }
            if relay_env.insert(upper.clone(), v.clone()).is_some() {
                twice.push(upper);
            }
        }
        if !twice.is_empty() {
            twice.sort();
            return Err(ConfigError(
                twice
                    .into_iter()
                    .map(|k| {
                        format!("{k}: set twice in the environment, in different letter cases")
                    })
                    .collect(),
            ));
        }
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(relay_env)),
        );
        let merged: Value = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(vec![format!("cannot parse configuration: {e}")]))?;
        let Value::Object(root) = merged else {
            return Err(ConfigError(vec!["configuration is not a table".into()]));
        };
        let mut errs = Vec::new();
        let settings = Settings::from_map(root, env, &mut errs);
        match settings {
            Some(s) if errs.is_empty() => Ok(s),
            _ => Err(ConfigError(errs)),
        }
    }

    fn from_map(
        mut root: Map<String, Value>,
        env: &HashMap<String, String>,
        errs: &mut Vec<String>,
    ) -> Option<Settings> {
        let mut t = Table::new(&mut root, "", errs);
        let database_url: Option<String> = t.opt("database_url");
        let batch_size = t.int("batch_size", 10, 1, 100_000);
        let delete_batch_size = t.int("delete_batch_size", 50, 1, 100_000);
        let in_flight_batches = t.int("in_flight_batches", 4, 1, 64);
        let process_interval = t.duration("process_interval", Duration::from_secs(5));
        let max_retries = t.int("max_retries", 3, 0, 1_000) as i32;
        let dead_letter_size = t.int("dead_letter_size", 1000, 0, i64::MAX as u64) as i64;
        let operation_timeout = t.duration("operation_timeout", Duration::from_secs(30));
        let enabled = t.get("enabled", true);

        let mut retry_map = t.table("retry");
        let mut r = Table::new(&mut retry_map, "retry.", t.errs);
        let retry = RetrySettings {
            backoff_base: r.duration("backoff_base", Duration::from_secs(1)),
            backoff_max: r.duration("backoff_max", Duration::from_secs(300)),
            after_dead_letter: r.get("after_dead_letter", AfterDeadLetter::Continue),
        };
        r.finish();

        let mut kafka_map = t.table("kafka");
        let mut k = Table::new(&mut kafka_map, "kafka.", t.errs);
        let brokers: String = k.get("brokers", "localhost:9092".to_string());
        let raw_props: BTreeMap<String, Value> = k.get("properties", BTreeMap::new());
        k.finish();
        let mut properties = BTreeMap::new();
        for (key, value) in raw_props {
            // Environment keys cannot hold dots; librdkafka names never hold underscores.
            let key = key.replace('_', ".");
            let value = match value {
                Value::String(s) => s,
                Value::Null => String::new(),
                other => other.to_string(),
            };
            properties.insert(key, value);
        }

        let mut http_map = t.table("http");
        let mut h = Table::new(&mut http_map, "http.", t.errs);
        let listen: String = h.get("listen", "0.0.0.0:8080".to_string());
        h.finish();

        let mut health_map = t.table("health");
        let mut he = Table::new(&mut health_map, "health.", t.errs);
        let health = HealthSettings {
            lag_threshold: he.duration("lag_threshold", Duration::from_secs(60)),
            refresh_interval: he.duration("refresh_interval", Duration::from_secs(5)),
        };
        he.finish();

        let mut log_map = t.table("log");
        let mut l = Table::new(&mut log_map, "log.", t.errs);
        let log = LogSettings {
            level: l.get("level", "info".to_string()),
            format: l.get("format", LogFormat::Auto),
        };
        l.finish();

        let raw_sources: Vec<Value> = t.get("sources", Vec::new());
        t.finish();

        let shared_url = database_url
            .as_deref()
            .and_then(|u| match DatabaseUrl::parse(u) {
                Ok(u) => Some(u),
                Err(e) => {
                    errs.push(format!("database_url: {e}"));
                    None
                }
            });

        let mut sources = Vec::new();
        let mut names = HashSet::new();
        let mut schemas = HashSet::new();
        for (i, raw) in raw_sources.into_iter().enumerate() {
            let prefix = format!("sources[{i}].");
            let Value::Object(mut map) = raw else {
                errs.push(format!("sources[{i}]: expected a table"));
                continue;
            };
            let mut s = Table::new(&mut map, &prefix, errs);
            let name: Option<String> = s.required("name");
            let url: Option<String> = s.opt("database_url");
            let url_env: Option<String> = s.opt("database_url_env");
            let schema: String = s.get("schema", "outbox".to_string());
            let topic: Option<String> = s.required("topic");
            s.finish();

            if let Some(n) = &name {
                if n.is_empty()
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    errs.push(format!("{prefix}name: {n:?} must be non-empty and use only letters, digits, '-', '_' and '.'"));
                } else if !names.insert(n.clone()) {
                    errs.push(format!("{prefix}name: {n:?} is used by two sources"));
                }
            }
            if !is_identifier(&schema) {
                errs.push(format!("{prefix}schema: {schema:?} is not a plain identifier (lowercase letters, digits and '_', not starting with a digit, at most 63 bytes)"));
            }
            if let Some(t) = &topic {
                if let Err(e) = validate_topic(t) {
                    errs.push(format!("{prefix}topic: {e}"));
                }
            }
            let url = match (url, url_env) {
                (Some(_), Some(_)) => {
                    errs.push(format!(
                        "{prefix}database_url and {prefix}database_url_env: set one, not both"
                    ));
                    None
                }
                (Some(u), None) => match DatabaseUrl::parse(&u) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        errs.push(format!("{prefix}database_url: {e}"));
                        None
                    }
                },
                (None, Some(var)) => match env.get(&var) {
                    Some(u) => match DatabaseUrl::parse(u) {
                        Ok(u) => Some(u),
                        Err(e) => {
                            errs.push(format!("{prefix}database_url_env: ${var}: {e}"));
                            None
                        }
                    },
                    None => {
                        errs.push(format!(
                            "{prefix}database_url_env: environment variable {var} is not set"
                        ));
                        None
                    }
                },
                (None, None) => match &shared_url {
                    Some(u) => Some(u.clone()),
                    None => {
                        if database_url.is_none() {
                            errs.push(format!("{prefix}database_url: not set, and neither {prefix}database_url_env nor a top-level database_url (OUTBOX_DATABASE_URL) is"));
                        }
                        None
                    }
                },
            };
            if let Some(u) = &url {
                if !schemas.insert((u.identity(), schema.clone())) {
                    errs.push(format!(
                        "{prefix}schema: {schema:?} in the same database is used by two sources"
                    ));
                }
            }
            if let (Some(name), Some(database_url), Some(topic)) = (name, url, topic) {
                sources.push(SourceSettings {
                    name,
                    database_url,
                    schema,
                    topic,
                });
            }
        }

        if brokers.trim().is_empty() {
            errs.push("kafka.brokers: must name at least one host:port".into());
        }
        for (key, fixed) in FIXED_KAFKA_PROPERTIES {
            if let Some(v) = properties.get(*key) {
                if v != fixed {
                    errs.push(format!(
                        "kafka.properties.{key}: the record contract fixes it to {fixed:?}, got {v:?}"
                    ));
                }
            }
        }
        if properties.contains_key("bootstrap.servers") {
            errs.push("kafka.properties.bootstrap.servers: set kafka.brokers instead".into());
        }
        let listen = match listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(e) => {
                errs.push(format!(
                    "http.listen: {listen:?} is not an address like 0.0.0.0:8080: {e}"
                ));
                None
            }
        };
        if operation_timeout < Duration::from_secs(1) {
            errs.push("operation_timeout: must be at least 1s".into());
        }
        if process_interval.is_zero() {
            errs.push("process_interval: must be greater than zero".into());
        }
        if retry.backoff_base.is_zero() || retry.backoff_max < retry.backoff_base {
            errs.push(
                "retry.backoff_base, retry.backoff_max: need 0 < backoff_base <= backoff_max"
                    .into(),
            );
        }

        Some(Settings {
            database_url: shared_url,
            batch_size: batch_size as usize,
            delete_batch_size: delete_batch_size as usize,
            in_flight_batches: in_flight_batches as usize,
            process_interval,
            max_retries,
            dead_letter_size,
            operation_timeout,
            enabled,
            retry,
            kafka: KafkaSettings {
                brokers,
                properties,
            },
            http: HttpSettings { listen: listen? },
            health,
            log,
            sources,
        })
    }

    /// Fails unless at least one source is configured (`run` and `migrate` need one).
    pub fn require_sources(&self) -> Result<(), ConfigError> {
        if self.sources.is_empty() {
            return Err(ConfigError(vec![
                "sources: no [[sources]] configured; name at least one outbox table to relay"
                    .into(),
            ]));
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }

    /// The source with this name.
    pub fn source(&self, name: &str) -> Result<&SourceSettings, ConfigError> {
        self.sources.iter().find(|s| s.name == name).ok_or_else(|| {
            let known: Vec<_> = self.sources.iter().map(|s| s.name.as_str()).collect();
            ConfigError(vec![format!(
                "no source named {name:?}; configured: {}",
                known.join(", ")
            )])
        })
    }
}

/// Every problem found in a configuration, reported at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration:")?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// True for a plain lowercase SQL identifier that needs no quoting.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c == '_' || c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c == '_' || c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// Checks a topic name against Kafka's rules.
pub fn validate_topic(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > 249 {
        return Err(format!("{t:?} must be 1 to 249 characters long"));
    }
    if t == "." || t == ".." {
        return Err(format!("{t:?} is not a valid topic name"));
    }
    if let Some(c) = t
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(format!(
            "{t:?} holds {c:?}; topic names use only ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Parses a duration: a number of seconds (`5`, `"5"`, `0.25`) or humantime (`"250ms"`, `"1m 30s"`).
pub fn parse_duration(v: &Value) -> Result<Duration, String> {
    match v {
        Value::Number(n) => n
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| format!("{n} is not a non-negative number of seconds")),
        Value::String(s) => {
            let s = s.trim();
            if let Ok(secs) = s.parse::<f64>() {
                if secs.is_finite() && secs >= 0.0 {
                    return Ok(Duration::from_secs_f64(secs));
                }
            }
            humantime::parse_duration(s).map_err(|e| {
                format!("{s:?} is not a duration (a number of seconds, or like \"250ms\", \"30s\", \"5m\"): {e}")
            })
        }
        other => Err(format!("{other} is not a duration")),
    }
}

/// Reads typed keys out of one table, recording every problem under its full key path.
struct Table<'a> {
    map: &'a mut Map<String, Value>,
    prefix: String,
    errs: &'a mut Vec<String>,
}

impl<'a> Table<'a> {
    fn new(map: &'a mut Map<String, Value>, prefix: &str, errs: &'a mut Vec<String>) -> Self {
        Table {
            map,
            prefix: prefix.to_string(),
            errs,
        }
    }

    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    fn get<T: DeserializeOwned>(&mut self, key: &str, default: T) -> T {
        match self.take(key) {
            None => default,
            Some(v) => match coerce::<T>(v) {
                Ok(t) => t,
                Err(e) => {
                    self.errs.push(format!("{}{key}: {e}", self.prefix));
                    default
                }
            },
        }
    }

    fn opt<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let v = self.take(key)?;
        match coerce::<T>(v) {
            Ok(t) => Some(t),
            Err(e) => {
                self.errs.push(format!("{}{key}: {e}", self.prefix));
                None
            }
        }
    }

    fn required<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        if !self.map.contains_key(key) {
            self.errs.push(format!("{}{key}: required", self.prefix));
            return None;
        }
        self.opt(key)
    }

    fn int(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        let v: u64 = self.get(key, default);
        if v < min || v > max {
            self.errs.push(format!(
                "{}{key}: {v} is outside {min}..={max}",
                self.prefix
            ));
            return default;
        }
        v
    }

    fn duration(&mut self, key: &str, default: Duration) -> Duration {
        match self.take(key) {
            None => default,
            Some(v) => parse_duration(&v).unwrap_or_else(|e| {
                self.errs.push(format!("{}{key}: {e}", self.prefix));
                default
            }),
        }
    }

    fn table(&mut self, key: &str) -> Map<String, Value> {
        match self.take(key) {
            None => Map::new(),
            Some(Value::Object(m)) => m,
            Some(other) => {
                self.errs.push(format!(
                    "{}{key}: expected a table, got {other}",
                    self.prefix
                ));
                Map::new()
            }
        }
    }

    /// Reports every key nobody asked for: a typo fails at start.
    fn finish(self) {
        for key in self.map.keys() {
            self.errs.push(format!("{}{key}: unknown key", self.prefix));
        }
    }
}

/// Deserializes a value, also accepting the strings the environment yields for numbers and booleans.
fn coerce<T: DeserializeOwned>(v: Value) -> Result<T, String> {
    match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => Ok(t),
        Err(first) => {
            if let Value::String(s) = &v {
                let trimmed = s.trim();
                let alt = if let Ok(i) = trimmed.parse::<i64>() {
                    Some(Value::from(i))
                } else if let Ok(b) = trimmed.to_ascii_lowercase().parse::<bool>() {
                    Some(Value::from(b))
                } else {
                    None
                };
                if let Some(alt) = alt {
                    if let Ok(t) = serde_json::from_value::<T>(alt) {
                        return Ok(t);
                    }
                }
            }
            Err(first.to_string())
        }
    }
}

fn serialize_redacted_properties<S: serde::Serializer>(
    props: &BTreeMap<String, String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let redacted: BTreeMap<&str, &str> = props
        .iter()
        .map(|(k, v)| {
            let secret = ["password", "secret", ".key.pem", "ssl.key", "sasl.jaas"]
                .iter()
                .any(|w| k.contains(w));
            (k.as_str(), if secret { "[redacted]" } else { v.as_str() })
        })
        .collect();
    redacted.serialize(s)
}

/// Durations rendered as humantime strings in the effective configuration.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const ONE_SOURCE: &str = r#"
database_url = "postgres://relay:pw@db:5432/app"
[[sources]]
name = "customer"
schema = "customer"
topic = "customer.events"
"#;

    #[test]
    fn defaults_follow_the_plan() {
        let s = Settings::from_parts(Some(ONE_SOURCE), &env(&[])).unwrap();
        assert_eq!(s.batch_size, 10);
        assert_eq!(s.delete_batch_size, 50);
        assert_eq!(s.process_interval, Duration::from_secs(5));
        assert_eq!(s.max_retries, 3);
        assert_eq!(s.dead_letter_size, 1000);
        assert_eq!(s.operation_timeout, Duration::from_secs(30));
        assert!(s.enabled);
        assert_eq!(s.http.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.sources[0].schema, "customer");
    }

    #[test]
    fn environment_overrides_file_and_bare_numbers_are_seconds() {
        let s = Settings::from_parts(
            Some(ONE_SOURCE),
            &env(&[
                ("OUTBOX_BATCH_SIZE", "500"),
                ("OUTBOX_PROCESS_INTERVAL", "5"),
                ("OUTBOX_OPERATION_TIMEOUT", "250ms"),
                ("OUTBOX_ENABLED", "false"),
                ("OUTBOX_KAFKA__BROKERS", "k1:9092,k2:9092"),
                ("OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
                ("OUTBOX_HTTP__LISTEN", "127.0.0.1:9000"),
                ("OUTBOX_CONFIG", "/ignored.toml"),
            ]),
        );
        // 250ms is below the 1s floor of operation_timeout: reported, not silently accepted.
        let err = s.unwrap_err();
        assert_eq!(
            err.0,
            vec!["operation_timeout: must be at least 1s".to_string()]
        );

        let s = Settings::from_parts(
            Some(ONE_SOURCE),
            &env(&[
                ("OUTBOX_BATCH_SIZE", "500"),
                ("OUTBOX_PROCESS_INTERVAL", "0.25"),
                ("OUTBOX_ENABLED", "false"),
                ("OUTBOX_KAFKA__BROKERS", "k1:9092,k2:9092"),
                ("OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
                ("OUTBOX_HTTP__LISTEN", "127.0.0.1:9000"),
            ]),
        )
        .unwrap();
        assert_eq!(s.batch_size, 500);
        assert_eq!(s.process_interval, Duration::from_millis(250));
        assert!(!s.enabled);
        assert_eq!(s.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(s.kafka.properties["sasl.password"], "hunter2");
        assert_eq!(s.http.listen.port(), 9000);
        let shown = s.redacted_toml();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains(":pw@"), "{shown}");
    }

    #[test]
    fn the_plans_lowercase_names_work_as_environment_variables() {
        let s = Settings::from_parts(
            Some(ONE_SOURCE),
            &env(&[
                ("outbox_batch_size", "25"),
                ("outbox_kafka__brokers", "k:9092"),
            ]),
        )
        .unwrap();
        assert_eq!(s.batch_size, 25);
        assert_eq!(s.kafka.brokers, "k:9092");
        let err = Settings::from_parts(
            Some(ONE_SOURCE),
            &env(&[("outbox_batch_size", "25"), ("OUTBOX_BATCH_SIZE", "26")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("set twice"), "{err}");
        let err = Settings::from_parts(Some(ONE_SOURCE), &env(&[("outbox_bach_size", "25")]))
            .unwrap_err();
        assert!(err.to_string().contains("bach_size: unknown key"), "{err}");
        let s = Settings::from_parts(Some(ONE_SOURCE), &env(&[("OUTBOX_IN_FLIGHT_BATCHES", "1")]))
            .unwrap();
        assert_eq!(s.in_flight_batches, 1);
    }

    #[test]
    fn every_bad_key_is_reported_at_once() {
        let toml = r#"
batch_sise = 5
batch_size = 0
in_flight_batches = 65
process_interval = "soon"
[kafka]
brokers = ""
[kafka.properties]
acks = "1"
[[sources]]
name = "a"
schema = "Bad-Schema; drop table x"
topic = "bad topic"
[[sources]]
schema = "b"
"#;
        let err = Settings::from_parts(Some(toml), &env(&[])).unwrap_err();
        let text = err.to_string();
        for needle in [
            "batch_sise: unknown key",
            "batch_size: 0 is outside",
            "in_flight_batches: 65 is outside",
            "process_interval:",
            "kafka.brokers:",
            "kafka.properties.acks:",
            "sources[0].schema:",
            "sources[0].topic:",
            "sources[0].database_url: not set",
            "sources[1].name: required",
            "sources[1].topic: required",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn a_source_url_can_come_from_a_named_environment_variable() {
        let toml = r#"
[[sources]]
name = "customer"
schema = "customer"
topic = "customer.events"
database_url_env = "CUSTOMER_DATABASE_URL"
"#;
        let err = Settings::from_parts(Some(toml), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("CUSTOMER_DATABASE_URL is not set"));
        let s = Settings::from_parts(
            Some(toml),
            &env(&[("CUSTOMER_DATABASE_URL", "postgres://u:secret@h/db")]),
        )
        .unwrap();
        assert_eq!(s.sources[0].database_url.identity(), "h:5432/db");
        assert!(!s.redacted_toml().contains("secret"));
    }

    #[test]
    fn two_sources_on_one_schema_of_one_database_are_refused() {
        let toml = r#"
database_url = "postgres://u@h/db"
[[sources]]
name = "a"
topic = "t"
[[sources]]
name = "b"
topic = "t"
"#;
        let err = Settings::from_parts(Some(toml), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("used by two sources"), "{err}");
    }

    #[test]
    fn the_shipped_example_loads_with_urls_from_the_environment() {
        let url = "postgres://relay:pw@db:5432/platform?sslmode=verify-full";
        let env = env(&[
            ("CUSTOMER_DATABASE_URL", url),
            ("PRODUCT_DATABASE_URL", url),
            ("PRODUCT_ADMIN_DATABASE_URL", url),
            ("PRODUCT_LOADER_DATABASE_URL", url),
        ]);
        let s = Settings::from_parts(Some(include_str!("../config/default.toml")), &env).unwrap();
        let names: Vec<_> = s.sources.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["customer", "product", "product-admin", "product-loader"]
        );
        assert_eq!((s.batch_size, s.delete_batch_size), (100, 100));
        assert_eq!(s.in_flight_batches, 4);
        assert_eq!(s.kafka.properties["compression.type"], "lz4");
    }

    #[test]
    fn durations_accept_seconds_and_humantime() {
        assert_eq!(
            parse_duration(&Value::from(5)).unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(
            parse_duration(&Value::from("5")).unwrap(),
            Duration::from_secs(5)
        );
        assert_eq!(
            parse_duration(&Value::from("250ms")).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration(&Value::from("1m 30s")).unwrap(),
            Duration::from_secs(90)
        );
        assert!(parse_duration(&Value::from("-1")).is_err());
        assert!(parse_duration(&Value::from(true)).is_err());
    }

    #[test]
    fn identifiers_and_topics() {
        assert!(is_identifier("product_admin"));
        assert!(!is_identifier("Product"));
        assert!(!is_identifier("1abc"));
        assert!(!is_identifier("a\"; drop"));
        assert!(validate_topic("customer.events").is_ok());
        assert!(validate_topic("bad topic").is_err());
        assert!(validate_topic("..").is_err());
        assert!(validate_topic(&"x".repeat(250)).is_err());
    }
}
