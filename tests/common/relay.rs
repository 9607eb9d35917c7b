//! The relay under test: its configuration ([`RelayConfig`], a TOML table built with
//! setters) and the relay running in this process ([`TestRelay`]).
//!
//! A [`RelayConfig`] never edits TOML text: every override is a key put into the table,
//! and the relay's own loader, which refuses unknown keys and bad values, reads the
//! result, so an override that does not apply fails the test instead of going unnoticed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use outbox_relay::app::{self, Running};
use outbox_relay::config::Settings;
use tokio_util::sync::CancellationToken;
use toml::{Table, Value};

use super::http;
use super::outbox::TestSource;
use super::wait::eventually;

/// A relay configuration under construction.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    table: Table,
}

impl Default for RelayConfig {
    /// Test-friendly timings (a 200 ms poll and health refresh, a 10 s operation timeout),
    /// an HTTP server on a port of the kernel's choosing, no brokers and no sources yet.
    fn default() -> RelayConfig {
        RelayConfig {
            table: Table::new(),
        }
        .set("process_interval", "200ms")
        .set("operation_timeout", "10s")
        .set("http.listen", "127.0.0.1:0")
        .set("health.refresh_interval", "200ms")
    }
}

impl RelayConfig {
    /// Sets `path` (dotted: `"retry.backoff_base"`) to `value`, creating the tables on the
    /// way. Panics if a part of the path names something that is not a table.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> RelayConfig {
        let (tables, key) = split(path);
        table_at(&mut self.table, &tables).insert(key.to_string(), value.into());
        self
    }

    /// Removes `path`; panics if it is not set, so a removal cannot miss.
    pub fn unset(mut self, path: &str) -> RelayConfig {
        let (tables, key) = split(path);
        if table_at(&mut self.table, &tables).remove(key).is_none() {
            panic!("unset({path}): not set in\n{}", self.to_toml());
        }
        self
    }

    /// Sets the librdkafka property `name` (dotted itself) in `[kafka.properties]`.
    pub fn kafka_property(mut self, name: &str, value: &str) -> RelayConfig {
        table_at(&mut self.table, &["kafka", "properties"]).insert(name.into(), value.into());
        self
    }

    /// Adds `src` as a `[[sources]]` entry: name, database_url, schema, topic.
    pub fn source(mut self, src: &TestSource) -> RelayConfig {
        let mut t = Table::new();
        t.insert("name".into(), src.name.as_str().into());
        t.insert("database_url".into(), src.url.as_str().into());
        t.insert("schema".into(), src.schema.as_str().into());
        t.insert("topic".into(), src.topic.as_str().into());
        let sources = self
            .table
            .entry("sources")
            .or_insert_with(|| Value::Array(Vec::new()));
        sources
            .as_array_mut()
            .expect("sources is an array")
            .push(Value::Table(t));
        self
    }

    /// Adds a `[[sources]]` entry that finds its schemas by `schema_pattern`.
    pub fn pattern(mut self, name: &str, url: &str, pattern: &str, topic: &str) -> RelayConfig {
        let mut t = Table::new();
        t.insert("name".into(), name.into());
        t.insert("database_url".into(), url.into());
        t.insert("schema_pattern".into(), pattern.into());
        t.insert("topic".into(), topic.into());
        self.table
            .entry("sources")
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .expect("sources is an array")
            .push(Value::Table(t));
        self
    }

    /// Removes the source called `name`; panics if there is no such source.
    pub fn source_remove(mut self, name: &str) -> RelayConfig {
        let text = self.to_toml();
        let sources = self
            .table
            .get_mut("sources")
            .and_then(Value::as_array_mut)
            .unwrap_or_else(|| panic!("no sources in\n{text}"));
        let before = sources.len();
        sources.retain(|t| t.get("name").and_then(Value::as_str) != Some(name));
        assert_eq!(
            sources.len() + 1,
            before,
            "no source named {name} in\n{text}"
        );
        self
    }

    /// Sets `key` of the source called `name`; panics if there is no such source.
    pub fn source_set(mut self, name: &str, key: &str, value: impl Into<Value>) -> RelayConfig {
        self.source_table(name).insert(key.into(), value.into());
        self
    }

    /// Removes `key` of the source called `name`; panics if it is not set.
    pub fn source_unset(mut self, name: &str, key: &str) -> RelayConfig {
        if self.source_table(name).remove(key).is_none() {
            panic!(
                "source_unset({name}, {key}): not set in\n{}",
                self.to_toml()
            );
        }
        self
    }

    fn source_table(&mut self, name: &str) -> &mut Table {
        let text = self.to_toml();
        self.table
            .get_mut("sources")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
            .filter_map(Value::as_table_mut)
            .find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            .unwrap_or_else(|| panic!("no source named {name} in\n{text}"))
    }

    /// The configuration as TOML text, as a file would hold it.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table).expect("render TOML")
    }

    /// The relay's settings from this configuration and an empty environment; panics with
    /// every problem the relay's loader finds.
    pub fn settings(&self) -> Settings {
        let text = self.to_toml();
        Settings::from_parts(Some(&text), &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
}

fn split(path: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let key = parts.pop().expect("a key");
    (parts, key)
}

fn table_at<'t>(root: &'t mut Table, path: &[&str]) -> &'t mut Table {
    path.iter().fold(root, |t, part| {
        t.entry(*part)
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .unwrap_or_else(|| panic!("{part} is not a table"))
    })
}

/// Applies the migrations to every source of `settings`.
pub async fn migrate(settings: &Settings) {
    outbox_relay::migrate::migrate_all(settings)
        .await
        .expect("migrate");
}

/// A relay running in this process; cancelled and drained on `stop`.
pub struct TestRelay {
    pub running: Option<Running>,
    pub cancel: CancellationToken,
    pub addr: SocketAddr,
}

impl TestRelay {
    pub async fn start(settings: Settings) -> TestRelay {
        let cancel = CancellationToken::new();
        let running = app::start(settings, cancel.clone())
            .await
            .expect("start relay");
        TestRelay {
            addr: running.addr,
            running: Some(running),
            cancel,
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("relay running")
    }

    pub async fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(30), r.wait())
                .await
                .expect("relay drains within 30s")
                .expect("relay stops cleanly");
        }
    }

    /// GET `path` on the relay's HTTP server: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http::get(self.addr, path).await
    }

    /// Polls `path` until `ok(status, body)` holds; returns that answer.
    pub async fn until(
        &self,
        path: &str,
        deadline: Duration,
        ok: impl Fn(u16, &str) -> bool,
    ) -> (u16, String) {
        eventually(
            &format!("GET {path} satisfies the condition"),
            deadline,
            async || {
                let (code, body) = self.get(path).await;
                if ok(code, &body) {
                    Ok((code, body))
                } else {
                    Err(format!("{code} {body}"))
                }
            },
        )
        .await
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
