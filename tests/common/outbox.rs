//! One outbox source of a test (its own schema and topic), writing events into it the way
//! a service does, counting what is left, and checking what consumers received.

use std::collections::{HashMap, HashSet};

use super::broker::Received;
use super::postgres::PgServer;
use super::process::unique_name;

/// One source of a test relay.
#[derive(Debug, Clone)]
pub struct TestSource {
    pub name: String,
    /// The database on the test's server that holds the schema.
    pub db: String,
    pub url: String,
    pub schema: String,
    pub topic: String,
}

impl TestSource {
    /// A source with a fresh schema and topic named after `prefix`, in database `db`; its
    /// name is the schema's with `-` for `_`.
    pub fn new(pg: &PgServer, db: &str, prefix: &str) -> TestSource {
        let mut src = TestSource::named(pg, db, prefix);
        src.name = src.schema.replace('_', "-");
        src
    }

    /// A source called `name` (as a test refers to it in metrics or the CLI), with a fresh
    /// schema and topic, in database `db`.
    pub fn named(pg: &PgServer, db: &str, name: &str) -> TestSource {
        let schema = unique_name(name);
        TestSource {
            name: name.to_string(),
            db: db.to_string(),
            url: pg.url(db),
            topic: format!("{schema}.events"),
            schema,
        }
    }
}

/// Inserts `n` events for `aggregates` aggregates round-robin in one transaction;
/// the payload is `{"agg": a, "seq": s}` with `s` counting per aggregate from `first_seq`.
pub fn insert_events(
    pg: &PgServer,
    src: &TestSource,
    n: usize,
    aggregates: usize,
    first_seq: usize,
) {
    pg.psql(
        &src.db,
        &format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'agg-' || (i % {aggregates}), 'OrderChanged', \
                    jsonb_build_object('agg', i % {aggregates}, 'seq', {first_seq} + i / {aggregates}) \
             FROM generate_series(0, {n} - 1) AS i ORDER BY i",
            schema = src.schema
        ),
    );
}

/// Rows left in a source's outbox.
pub fn outbox_rows(pg: &PgServer, src: &TestSource) -> i64 {
    count(pg, src, "outbox")
}

/// Rows in a source's dead-letter table.
pub fn dead_letter_rows(pg: &PgServer, src: &TestSource) -> i64 {
    count(pg, src, "outbox_dead_letter")
}

fn count(pg: &PgServer, src: &TestSource, table: &str) -> i64 {
    pg.psql(
        &src.db,
        &format!("SELECT count(*) FROM {}.{table}", src.schema),
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
    let mut seen = HashSet::new();
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
