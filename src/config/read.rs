//! Reading the layered map (built-in defaults, the TOML file, the environment) into
//! [`Settings`], key by key: every unknown key, bad value and contradiction is recorded
//! under its full path, and reported together.

use super::*;

impl Settings {
    pub(super) fn from_map(
        mut root: Map<String, Value>,
        env: &HashMap<String, String>,
        errs: &mut Vec<String>,
    ) -> Option<Settings> {
        let mut t = Table::new(&mut root, "", errs);
        let database_url: Option<String> = t.opt("database_url");
        let coordination_url: Option<String> = t.opt("coordination_url");
        let batch_size = t.int("batch_size", 10, 1, 100_000);
        let max_batch_size = t.int("max_batch_size", 2000, 1, 100_000);
        let delete_batch_size = t.int("delete_batch_size", 50, 1, 100_000);
        let in_flight_batches = t.int("in_flight_batches", 4, 1, 64);
        let pool_size = t.int("pool_size", 4, 1, 1_000);
        let process_interval = t.duration("process_interval", Duration::from_secs(5));
        let wakeup = t.get("wakeup", Wakeup::Notify);
        let record_format = t.get("record_format", RecordFormat::Plain);
        let cloudevents_source: String = t.get(
            "cloudevents_source",
            format!("/outbox-relay/{SOURCE_PLACEHOLDER}"),
        );
        let max_retries = t.int("max_retries", 3, 0, 1_000) as i32;
        let dead_letter_size = t.int("dead_letter_size", 1000, 0, i64::MAX as u64) as i64;
        let operation_timeout = t.duration("operation_timeout", Duration::from_secs(30));
        let enabled = t.get("enabled", true);
        let discovery_interval = t.duration("discovery_interval", Duration::from_secs(30));

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

        let shared_url = parse_url("database_url", database_url.as_deref(), errs);
        let shared_coordination = parse_url("coordination_url", coordination_url.as_deref(), errs);

        let mut sources = Vec::new();
        let mut patterns = Vec::new();
        let mut names = HashSet::new();
        let mut schemas = HashSet::new();
        let mut coordination: HashMap<String, Option<String>> = HashMap::new();
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
            let coord: Option<String> = s.opt("coordination_url");
            let coord_env: Option<String> = s.opt("coordination_url_env");
            let schema: Option<String> = s.opt("schema");
            let pattern: Option<String> = s.opt("schema_pattern");
            let topic: Option<String> = s.required("topic");
            let own_format = s.get("record_format", record_format);
            let own_ce_source: String = s.get("cloudevents_source", cloudevents_source.clone());
            s.finish();

            if pattern.is_some() && schema.is_some() {
                errs.push(format!(
                    "{prefix}schema and {prefix}schema_pattern: set one, not both"
                ));
            }
            let templated = pattern.is_some();
            if let Some(n) = &name {
                let plain = n.replace(SCHEMA_PLACEHOLDER, "x");
                if n.is_empty()
                    || !plain
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                {
                    errs.push(format!("{prefix}name: {n:?} must be non-empty and use only letters, digits, '-', '_' and '.'{}", if templated { " (and {schema})" } else { "" }));
                } else if templated && !n.contains(SCHEMA_PLACEHOLDER) {
                    errs.push(format!("{prefix}name: {n:?} must contain {{schema}} when schema_pattern is set, so each matching schema's source has its own name"));
                } else if !templated && n.contains(SCHEMA_PLACEHOLDER) {
                    errs.push(format!(
                        "{prefix}name: {{schema}} is only replaced for a schema_pattern source"
                    ));
                } else if !names.insert(n.clone()) {
                    errs.push(format!("{prefix}name: {n:?} is used by two sources"));
                }
            }
            if let Some(p) = &pattern {
                if let Err(e) = SchemaPattern::parse(p) {
                    errs.push(format!("{prefix}schema_pattern: {e}"));
                }
            }
            let schema = schema.unwrap_or_else(|| "outbox".to_string());
            if !templated && !is_identifier(&schema) {
                errs.push(format!("{prefix}schema: {schema:?} is not a plain identifier (lowercase letters, digits and '_', not starting with a digit, at most 63 bytes)"));
            }
            if let Some(t) = &topic {
                if !templated && t.contains(SCHEMA_PLACEHOLDER) {
                    errs.push(format!(
                        "{prefix}topic: {{schema}} is only replaced for a schema_pattern source"
                    ));
                } else if let Err(e) = validate_topic(&t.replace(SCHEMA_PLACEHOLDER, "x")) {
                    errs.push(format!("{prefix}topic: {e}"));
                }
            }
            let own_url = source_url(&prefix, "database_url", url, url_env, env, errs);
            let own_coord = source_url(&prefix, "coordination_url", coord, coord_env, env, errs);
            let uses_shared = matches!(own_url, Ok(None));
            let url = match own_url {
                Err(()) => None,
                Ok(Some(u)) => Some(u),
                Ok(None) => match &shared_url {
                    Some(u) => Some(u.clone()),
                    None => {
                        if database_url.is_none() {
                            errs.push(format!("{prefix}database_url: not set, and neither {prefix}database_url_env nor a top-level database_url (OUTBOX_DATABASE_URL) is"));
                        }
                        None
                    }
                },
            };
            // A source on the shared database takes the shared coordination URL.
            let coordination_url = match own_coord {
                Err(()) => None,
                Ok(Some(c)) => Some(c),
                Ok(None) if uses_shared => shared_coordination.clone(),
                Ok(None) => None,
            };
            if let Some(u) = &url {
                // One coordination connection per database: its sources must agree on it.
                let said = coordination_url.as_ref().map(|c| c.to_string());
                match coordination.get(&u.pool_key()) {
                    Some(before) if *before != said => errs.push(format!(
                        "{prefix}coordination_url: sources of database {} name different coordination URLs; a database has one coordination connection per role",
                        u.identity()
                    )),
                    _ => {
                        coordination.insert(u.pool_key(), said);
                    }
                }
                let key = pattern.clone().unwrap_or_else(|| schema.clone());
                if !schemas.insert((u.identity(), key.clone())) {
                    errs.push(format!(
                        "{prefix}schema{}: {key:?} in the same database is used by two sources",
                        if templated { "_pattern" } else { "" }
                    ));
                }
            }
            match (name, url, topic, pattern) {
                (Some(name), Some(database_url), Some(topic), None) => {
                    sources.push(SourceSettings {
                        cloudevents_source: own_ce_source.replace(SOURCE_PLACEHOLDER, &name),
                        name,
                        database_url,
                        coordination_url,
                        schema,
                        topic,
                        record_format: own_format,
                    })
                }
                (Some(name), Some(database_url), Some(topic), Some(p)) => {
                    if let Ok(schema_pattern) = SchemaPattern::parse(&p) {
                        patterns.push(PatternSettings {
                            name,
                            database_url,
                            coordination_url,
                            schema_pattern,
                            topic,
                            record_format: own_format,
                            cloudevents_source: own_ce_source,
                        })
                    }
                }
                _ => {}
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
        if let Some(v) = properties.get("message.max.bytes") {
            if !matches!(v.trim().parse::<i64>(), Ok(n) if n >= 1000) {
                errs.push(format!(
                    "kafka.properties.message.max.bytes: {v:?} is not a number of bytes of at least 1000"
                ));
            }
        }
        if discovery_interval < Duration::from_secs(1) {
            errs.push("discovery_interval: must be at least 1s".into());
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
            max_batch_size: max_batch_size.max(batch_size) as usize,
            delete_batch_size: delete_batch_size as usize,
            in_flight_batches: in_flight_batches as usize,
            pool_size: pool_size as usize,
            wakeup,
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
            patterns,
            discovery_interval,
        })
    }
}

/// Parses an optional top-level URL, recording a bad one under `key`.
fn parse_url(key: &str, url: Option<&str>, errs: &mut Vec<String>) -> Option<DatabaseUrl> {
    match DatabaseUrl::parse(url?) {
        Ok(u) => Some(u),
        Err(e) => {
            errs.push(format!("{key}: {e}"));
            None
        }
    }
}

/// A source's own URL from `key` or `key_env` (the name of an environment variable):
/// `Ok(None)` when it names neither, `Err` when what it names is unusable (recorded).
fn source_url(
    prefix: &str,
    key: &str,
    url: Option<String>,
    url_env: Option<String>,
    env: &HashMap<String, String>,
    errs: &mut Vec<String>,
) -> Result<Option<DatabaseUrl>, ()> {
    match (url, url_env) {
        (Some(_), Some(_)) => {
            errs.push(format!(
                "{prefix}{key} and {prefix}{key}_env: set one, not both"
            ));
            Err(())
        }
        (Some(u), None) => DatabaseUrl::parse(&u).map(Some).map_err(|e| {
            errs.push(format!("{prefix}{key}: {e}"));
        }),
        (None, Some(var)) => match env.get(&var) {
            Some(u) => DatabaseUrl::parse(u).map(Some).map_err(|e| {
                errs.push(format!("{prefix}{key}_env: ${var}: {e}"));
            }),
            None => {
                errs.push(format!(
                    "{prefix}{key}_env: environment variable {var} is not set"
                ));
                Err(())
            }
        },
        (None, None) => Ok(None),
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
            // No interval or timeout of the relay can work at zero: a zero interval is
            // a busy loop (or, for tokio's `interval`, a panic at start).
            Some(v) => match parse_duration(&v) {
                Ok(d) if d.is_zero() => {
                    self.errs
                        .push(format!("{}{key}: must be greater than zero", self.prefix));
                    default
                }
                Ok(d) => d,
                Err(e) => {
                    self.errs.push(format!("{}{key}: {e}", self.prefix));
                    default
                }
            },
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
