//! Relay-specific test helpers: settings for a test's own schema and topic, migrations,
//! writing events the way a service does, starting the relay in-process, and checks of
//! what consumers received.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::app::{self, Running};
use outbox_relay::config::Settings;
use tokio_util::sync::CancellationToken;

use super::{PgServer, Received};

/// One source of a test relay.
pub struct TestSource {
    pub name: String,
    pub url: String,
    pub schema: String,
    pub topic: String,
}

impl TestSource {
    /// A source with a fresh schema and topic named after `prefix`, in database `db`.
    pub fn new(pg: &PgServer, db: &str, prefix: &str) -> TestSource {
        let schema = super::unique_name(prefix);
        TestSource {
            name: schema.replace('_', "-"),
            url: pg.url(db),
            topic: format!("{schema}.events"),
            schema,
        }
    }
}

/// TOML for a relay over `sources`, with test-friendly timings; `extra` is appended to
/// the top-level keys (before any table).
pub fn toml(sources: &[&TestSource], brokers: &str, extra: &str) -> String {
    let mut t = format!(
        "process_interval = \"200ms\"\noperation_timeout = \"10s\"\n{extra}\n\
         [kafka]\nbrokers = \"{brokers}\"\n[http]\nlisten = \"127.0.0.1:0\"\n\
         [health]\nrefresh_interval = \"200ms\"\n"
    );
    for s in sources {
        t.push_str(&format!(
            "[[sources]]\nname = \"{}\"\ndatabase_url = \"{}\"\nschema = \"{}\"\ntopic = \"{}\"\n",
            s.name, s.url, s.schema, s.topic
        ));
    }
    t
}

/// Settings from TOML, with an empty environment.
pub fn settings(toml: &str) -> Settings {
    Settings::from_parts(Some(toml), &HashMap::new()).unwrap_or_else(|e| panic!("{e}\n{toml}"))
}

/// Applies the migrations to every source.
pub async fn migrate(settings: &Settings) {
    outbox_relay::migrate::migrate_all(settings)
        .await
        .expect("migrate");
}

/// A relay running in this process; cancelled and drained on `stop`.
pub struct TestRelay {
    pub running: Option<Running>,
    pub cancel: CancellationToken,
    pub addr: std::net::SocketAddr,
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
        http_get(self.addr, path).await
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A minimal HTTP/1.1 GET over a plain socket: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Bodies may come chunked; strip chunk-size lines when they look like hex lengths.
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Inserts `n` events for `aggregates` aggregates round-robin in one transaction;
/// the payload is `{"agg": a, "seq": s}` with `s` counting per aggregate from `first_seq`.
pub fn insert_events(
    pg: &PgServer,
    db: &str,
    schema: &str,
    n: usize,
    aggregates: usize,
    first_seq: usize,
) {
    pg.psql(
        db,
        &format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'agg-' || (i % {aggregates}), 'OrderChanged', \
                    jsonb_build_object('agg', i % {aggregates}, 'seq', {first_seq} + i / {aggregates}) \
             FROM generate_series(0, {n} - 1) AS i ORDER BY i"
        ),
    );
}

/// Rows left in a source's outbox.
pub fn outbox_rows(pg: &PgServer, db: &str, schema: &str) -> i64 {
    pg.psql(db, &format!("SELECT count(*) FROM {schema}.outbox"))
        .parse()
        .expect("count")
}

/// Rows in a source's dead-letter table.
pub fn dead_letter_rows(pg: &PgServer, db: &str, schema: &str) -> i64 {
    pg.psql(
        db,
        &format!("SELECT count(*) FROM {schema}.outbox_dead_letter"),
    )
    .parse()
    .expect("count")
}

/// The value of a header.
pub fn header<'a>(r: &'a Received, name: &str) -> Option<&'a str> {
    r.headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Per-aggregate check of `{"seq": n}` payloads: returns (distinct events, duplicates,
/// order violations). A duplicate is an event_id seen before; an order violation is a
/// first sighting of a seq lower than one already seen for the same key.
pub fn audit(received: &[Received]) -> (usize, usize, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    let (mut dups, mut disorder) = (0, 0);
    for r in received {
        let id = header(r, "event_id").unwrap_or_default().to_string();
        if !seen.insert(id) {
            dups += 1;
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(r.value.as_deref().unwrap_or("null")).unwrap_or_default();
        let seq = v["seq"].as_i64().unwrap_or(-1);
        let key = r.key.clone().unwrap_or_default();
        let prev = last.entry(key).or_insert(-1);
        if seq < *prev {
            disorder += 1;
        } else {
            *prev = seq;
        }
    }
    (seen.len(), dups, disorder)
}

/// Polls the outbox until it is empty; panics after `deadline`.
pub async fn wait_outbox_empty(url: &str, schema: &str, deadline: Duration) {
    let end = tokio::time::Instant::now() + deadline;
    let client = super::connect(url).await;
    let mut left: i64 = -1;
    while tokio::time::Instant::now() < end {
        left = client
            .query_one(&format!("SELECT count(*) FROM {schema}.outbox"), &[])
            .await
            .expect("count")
            .get(0);
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{schema}.outbox still holds {left} rows after {deadline:?}");
}

/// A librdkafka mock cluster of one broker with `topics` created.
pub fn mock(
    topics: &[&str],
    partitions: i32,
) -> rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let m = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    for t in topics {
        m.create_topic(t, partitions, 1).expect("create topic");
    }
    m
}

/// Parses Prometheus text format, failing the test if it is not.
pub fn scrape(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text format: {e}\n{text}"))
}

/// The value of the first sample of `name` with `labels`.
pub fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => h.last().map(|b| b.count).unwrap_or(0.0),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
}

impl TestRelay {
    /// Polls `path` until `ok(status, body)` holds; returns that answer.
    pub async fn until(
        &self,
        path: &str,
        deadline: Duration,
        ok: impl Fn(u16, &str) -> bool,
    ) -> (u16, String) {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            let (code, body) = self.get(path).await;
            if ok(code, &body) {
                return (code, body);
            }
            assert!(
                tokio::time::Instant::now() < end,
                "{path} never satisfied the condition; last: {code} {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
