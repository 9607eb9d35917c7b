//! Typed settings: built-in defaults, then a TOML file, then the environment.
//!
//! Loading never stops at the first problem: [`Settings::load`] collects every
//! bad or unknown key and reports them together in one [`ConfigError`].
//!
//! This file holds the settings tree and the public entry points; `read.rs` turns the
//! layered map into it, key by key, and `tests.rs` tests both.

mod kafka;
mod read;

pub use kafka::{is_secret_property, KafkaSettings};

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
    /// Rows claimed per batch while traffic is light (`OUTBOX_BATCH_SIZE`).
    pub batch_size: usize,
    /// Rows claimed per batch at most (`OUTBOX_MAX_BATCH_SIZE`, 2000): a claim that comes back
    /// full is followed by one twice as large, up to this, while a backlog drains; one
    /// less than half full by one half as large, down to `batch_size`.
    pub max_batch_size: usize,
    /// Delivered rows deleted per statement (`OUTBOX_DELETE_BATCH_SIZE`).
    pub delete_batch_size: usize,
    /// Batches of one source handed to the producer and not yet acknowledged, at most
    /// (`OUTBOX_IN_FLIGHT_BATCHES`); beyond that, smaller batches still go out while the
    /// rows out stay within `in_flight_batches * batch_size`. 1 sends a batch only after
    /// the previous one's outcome is known.
    pub in_flight_batches: usize,
    /// Connections per database for claims, settles and stats, shared by its sources
    /// (`OUTBOX_POOL_SIZE`). Besides them the relay keeps one coordination connection
    /// per database, so a replica holds at most `databases * (1 + pool_size)`.
    pub pool_size: usize,
    /// How an idle source learns of new rows (`OUTBOX_WAKEUP`).
    pub wakeup: Wakeup,
    /// How often the database is looked at for sources with rows to claim, the fallback
    /// wake-up of idle sources (`OUTBOX_PROCESS_INTERVAL`; a bare number is seconds).
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
    /// The outbox tables to relay (`[[sources]]` naming a `schema`).
    pub sources: Vec<SourceSettings>,
    /// Sources found by schema name (`[[sources]]` giving a `schema_pattern`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patterns: Vec<PatternSettings>,
    /// How often the schemas matching a `schema_pattern` are listed again, to start the
    /// sources of new ones and stop those of schemas gone (`OUTBOX_DISCOVERY_INTERVAL`).
    #[serde(with = "humantime_serde_compat")]
    pub discovery_interval: Duration,
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

/// How a row becomes a Kafka record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordFormat {
    /// The relay's own contract: key, value and its headers (README, "The Kafka record").
    Plain,
    /// The same, plus CloudEvents' Kafka protocol binding in binary mode: `ce_specversion`
    /// 1.0, `ce_id`, `ce_type`, `ce_source`, `ce_time`, `ce_subject`, and `content-type`.
    #[serde(rename = "cloudevents")]
    CloudEvents,
}

/// What `{source}` stands for in `cloudevents_source`.
pub const SOURCE_PLACEHOLDER: &str = "{source}";

/// How an idle source learns of new rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wakeup {
    /// An idle source holds its waiting lock, and inserts into its outbox NOTIFY while
    /// it does (migration 005): milliseconds from commit to claim, and no NOTIFY (no
    /// cluster-wide lock at commit) while the relay is busy.
    Notify,
    /// No source ever waits on the lock, so no insert notifies: the services' commits
    /// pay nothing, and idle sources wake by the look every `process_interval`.
    Poll,
}

impl Wakeup {
    /// Its name in the configuration, logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Wakeup::Notify => "notify",
            Wakeup::Poll => "poll",
        }
    }
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
    /// The URL of the database's coordination connection (the sources' advisory locks
    /// and LISTEN), when it is not `database_url`: PostgreSQL directly, or a pooler in
    /// session mode, while the pool may go through a transaction-mode pooler.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordination_url: Option<DatabaseUrl>,
    /// Schema holding `outbox` and `outbox_dead_letter` (a plain lowercase identifier).
    pub schema: String,
    /// Topic for rows that name none.
    pub topic: String,
    /// How its rows become records.
    pub record_format: RecordFormat,
    /// `ce_source` of its records in CloudEvents format.
    pub cloudevents_source: String,
}

/// Where `{schema}` is replaced by a matching schema's name, in a pattern source's
/// `name` and `topic`.
pub const SCHEMA_PLACEHOLDER: &str = "{schema}";

/// Sources found by schema name: every schema of the database whose name matches
/// `schema_pattern` and that holds an outbox table is a source.
#[derive(Debug, Clone, Serialize)]
pub struct PatternSettings {
    /// The sources' names, with `{schema}` standing for the schema's name.
    pub name: String,
    /// The database the schemas are looked for in.
    pub database_url: DatabaseUrl,
    /// As [`SourceSettings::coordination_url`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coordination_url: Option<DatabaseUrl>,
    /// Which schemas: `*` stands for any run of characters, `?` for one.
    pub schema_pattern: SchemaPattern,
    /// The sources' topic for rows that name none; `{schema}` may stand in it.
    pub topic: String,
    /// As [`SourceSettings::record_format`].
    pub record_format: RecordFormat,
    /// As [`SourceSettings::cloudevents_source`], `{schema}` and `{source}` replaced.
    pub cloudevents_source: String,
}

impl PatternSettings {
    /// The source of one matching schema.
    pub fn source_for(&self, schema: &str) -> SourceSettings {
        SourceSettings {
            name: self.name.replace(SCHEMA_PLACEHOLDER, schema),
            database_url: self.database_url.clone(),
            coordination_url: self.coordination_url.clone(),
            schema: schema.to_string(),
            topic: self.topic.replace(SCHEMA_PLACEHOLDER, schema),
            record_format: self.record_format,
            cloudevents_source: self
                .cloudevents_source
                .replace(SCHEMA_PLACEHOLDER, schema)
                .replace(
                    SOURCE_PLACEHOLDER,
                    &self.name.replace(SCHEMA_PLACEHOLDER, schema),
                ),
        }
    }

    /// The schema a source name of this pattern stands for, if it is one.
    pub fn schema_of(&self, name: &str) -> Option<String> {
        let (head, tail) = self.name.split_once(SCHEMA_PLACEHOLDER)?;
        let schema = name.strip_prefix(head)?.strip_suffix(tail)?;
        (is_identifier(schema)
            && self.schema_pattern.matches(schema)
            && self.source_for(schema).name == name)
            .then(|| schema.to_string())
    }
}

/// A schema name pattern: lowercase letters, digits and `_`, with `*` for any run of
/// characters and `?` for one. PostgreSQL's own schemas (`pg_*`,
/// `information_schema`) never match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaPattern(String);

impl SchemaPattern {
    /// Checks a pattern.
    pub fn parse(p: &str) -> Result<SchemaPattern, String> {
        if p.is_empty() || p.len() > 63 {
            return Err(format!("{p:?} must be 1 to 63 characters long"));
        }
        if let Some(c) = p
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || "_*?".contains(*c)))
        {
            return Err(format!(
                "{p:?} holds {c:?}; a pattern uses lowercase letters, digits, '_', and '*' or '?' as wildcards"
            ));
        }
        if !p.contains(['*', '?']) {
            return Err(format!(
                "{p:?} has no wildcard ('*' or '?'); name one schema with `schema` instead"
            ));
        }
        Ok(SchemaPattern(p.to_string()))
    }

    /// Whether `schema` matches.
    pub fn matches(&self, schema: &str) -> bool {
        fn glob(p: &[u8], s: &[u8]) -> bool {
            match (p.first(), s.first()) {
                (None, None) => true,
                (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
                (Some(b'?'), Some(_)) => glob(&p[1..], &s[1..]),
                (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
                _ => false,
            }
        }
        !is_system_schema(schema) && glob(self.0.as_bytes(), schema.as_bytes())
    }

    /// The pattern for SQL's `LIKE ... ESCAPE '\'`.
    pub fn like(&self) -> String {
        self.0
            .chars()
            .map(|c| match c {
                '*' => "%".to_string(),
                '?' => "_".to_string(),
                '_' => "\\_".to_string(),
                c => c.to_string(),
            })
            .collect()
    }
}

impl fmt::Display for SchemaPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for SchemaPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// PostgreSQL's own schemas, which no pattern matches.
pub fn is_system_schema(schema: &str) -> bool {
    schema.starts_with("pg_") || schema == "information_schema"
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

    /// Fails unless at least one source is configured (`run` and `migrate` need one).
    pub fn require_sources(&self) -> Result<(), ConfigError> {
        if self.sources.is_empty() && self.patterns.is_empty() {
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

    /// The source with this name: a configured one, or the one a `schema_pattern`
    /// source names so for a matching schema.
    pub fn source(&self, name: &str) -> Result<SourceSettings, ConfigError> {
        if let Some(s) = self.sources.iter().find(|s| s.name == name) {
            return Ok(s.clone());
        }
        for p in &self.patterns {
            if let Some(schema) = p.schema_of(name) {
                return Ok(p.source_for(&schema));
            }
        }
        let known: Vec<_> = self
            .sources
            .iter()
            .map(|s| s.name.clone())
            .chain(
                self.patterns
                    .iter()
                    .map(|p| format!("{} (schemas {})", p.name, p.schema_pattern)),
            )
            .collect();
        Err(ConfigError(vec![format!(
            "no source named {name:?}; configured: {}",
            known.join(", ")
        )]))
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

/// Durations rendered as humantime strings in the effective configuration.
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests;
