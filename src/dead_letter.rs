//! `outbox-relay dead-letter list|show|replay|purge`: see, resend and drop events that
//! failed for good, without a SQL session.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio_postgres::types::ToSql;

use crate::config::SourceSettings;
use crate::db::quote_ident;
use crate::source::store::SHARED_COLUMNS;

/// Which dead-lettered rows an operation touches.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// These ids (the outbox ids the events had); empty means no id filter.
    pub ids: Vec<i64>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only rows dead-lettered longer ago than this.
    pub older_than: Option<Duration>,
    /// Required to touch every row when no id is given (replay and purge).
    pub all: bool,
}

impl Filter {
    fn check_scope(&self, verb: &str) -> Result<()> {
        if self.ids.is_empty() && !self.all {
            bail!("{verb}: name rows with --id, or pass --all (optionally narrowed by --event-type / --older-than)");
        }
        if !self.ids.is_empty() && self.all {
            bail!("{verb}: --id and --all exclude each other");
        }
        Ok(())
    }

    /// The WHERE clause over alias `d`, with parameters `$1..$3`.
    fn sql(&self) -> &'static str {
        "($1::bigint[] IS NULL OR d.id = ANY($1)) \
         AND ($2::text IS NULL OR d.event_type = $2) \
         AND ($3::float8 IS NULL OR d.failed_at < now() - $3 * interval '1 second')"
    }

    fn params(&self) -> (Option<Vec<i64>>, Option<String>, Option<f64>) {
        (
            (!self.ids.is_empty()).then(|| self.ids.clone()),
            self.event_type.clone(),
            self.older_than.map(|d| d.as_secs_f64()),
        )
    }
}

/// One dead-lettered event, as `list`, `show` and `--json` print it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadEvent {
    /// The outbox id it had (and gets back on replay).
    pub id: i64,
    /// Event id, kept on replay.
    pub event_id: String,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// Topic override.
    pub topic: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Idempotency token, kept on replay.
    pub idempotency_token: Option<String>,
    /// Attempts made.
    pub retry_count: i32,
    /// When the service wrote it.
    pub created_at: String,
    /// When it was dead-lettered.
    pub failed_at: String,
    /// Why.
    pub error: String,
    /// Payload (only from `show`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Extra headers (only from `show`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<serde_json::Value>,
}

async fn connect(source: &SourceSettings, timeout: Duration) -> Result<tokio_postgres::Client> {
    let (client, _notices) = source
        .database_url
        .connect(timeout)
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("source {}", source.name))?;
    Ok(client)
}

/// Lists dead-lettered events, oldest failure first, at most `limit`.
pub async fn list(
    source: &SourceSettings,
    filter: &Filter,
    limit: i64,
    with_bodies: bool,
    timeout: Duration,
) -> Result<Vec<DeadEvent>> {
    let client = connect(source, timeout).await?;
    let s = quote_ident(&source.schema);
    let sql = format!(
        "SELECT d.id, d.event_id::text, d.aggregate_type, d.aggregate_id, d.event_type, d.topic, \
         d.correlation_id, d.idempotency_token, d.retry_count, \
         to_char(d.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
         to_char(d.failed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), \
         d.error, d.payload::text, d.headers::text \
         FROM {s}.outbox_dead_letter d WHERE {} ORDER BY d.failed_at, d.id LIMIT $4",
        filter.sql()
    );
    let (ids, et, age) = filter.params();
    let rows = tokio::time::timeout(
        timeout,
        client.query(&sql, &[&ids as &(dyn ToSql + Sync), &et, &age, &limit]),
    )
    .await
    .context("list: timed out")??;
    Ok(rows
        .iter()
        .map(|r| {
            let json = |i: usize| -> Option<serde_json::Value> {
                if !with_bodies {
                    return None;
                }
                let t: Option<String> = r.get(i);
                Some(
                    t.and_then(|t| serde_json::from_str(&t).ok())
                        .unwrap_or(serde_json::Value::Null),
                )
            };
            DeadEvent {
                id: r.get(0),
                event_id: r.get(1),
                aggregate_type: r.get(2),
                aggregate_id: r.get(3),
                event_type: r.get(4),
                topic: r.get(5),
                correlation_id: r.get(6),
                idempotency_token: r.get(7),
                retry_count: r.get(8),
                created_at: r.get(9),
                failed_at: r.get(10),
                error: r.get(11),
                payload: json(12),
                headers: json(13),
            }
        })
        .collect())
}

/// Moves dead-lettered events back into the outbox, atomically, with their id, event_id
/// and idempotency_token kept and their retries reset. Returns the ids replayed.
pub async fn replay(
    source: &SourceSettings,
    filter: &Filter,
    timeout: Duration,
) -> Result<Vec<i64>> {
    filter.check_scope("replay")?;
    let mut client = connect(source, timeout).await?;
    let s = quote_ident(&source.schema);
    let sql = format!(
        "WITH moved AS (DELETE FROM {s}.outbox_dead_letter d WHERE {} RETURNING d.*) \
         INSERT INTO {s}.outbox ({SHARED_COLUMNS}) OVERRIDING SYSTEM VALUE \
         SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload, topic, headers, \
             correlation_id, idempotency_token, created_at, 'pending', 0, max_retries, \
             'replayed; was dead-lettered: ' || error, NULL, NULL \
         FROM moved ORDER BY id RETURNING id::int8",
        filter.sql()
    );
    let (ids, et, age) = filter.params();
    let tx = client.transaction().await?;
    let rows = tokio::time::timeout(timeout, tx.query(&sql, &[&ids, &et, &age]))
        .await
        .context("replay: timed out")?
        .context("replay (nothing was moved)")?;
    tx.commit().await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Deletes dead-lettered events for good. Returns the ids purged.
pub async fn purge(
    source: &SourceSettings,
    filter: &Filter,
    timeout: Duration,
) -> Result<Vec<i64>> {
    filter.check_scope("purge")?;
    let client = connect(source, timeout).await?;
    let s = quote_ident(&source.schema);
    let sql = format!(
        "DELETE FROM {s}.outbox_dead_letter d WHERE {} RETURNING d.id",
        filter.sql()
    );
    let (ids, et, age) = filter.params();
    let rows = tokio::time::timeout(timeout, client.query(&sql, &[&ids, &et, &age]))
        .await
        .context("purge: timed out")??;
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// A readable table of dead-lettered events.
pub fn table(events: &[DeadEvent]) -> String {
    if events.is_empty() {
        return "no dead-lettered events\n".into();
    }
    let mut out = format!(
        "{:<10} {:<24} {:<24} {:<20} {:>7}  {}\n",
        "ID", "FAILED AT", "EVENT TYPE", "AGGREGATE", "TRIES", "ERROR"
    );
    for e in events {
        let agg = format!("{}/{}", e.aggregate_type, e.aggregate_id);
        out.push_str(&format!(
            "{:<10} {:<24} {:<24} {:<20} {:>7}  {}\n",
            e.id,
            e.failed_at,
            clip(&e.event_type, 24),
            clip(&agg, 20),
            e.retry_count,
            clip(&e.error, 100)
        ));
    }
    out
}

/// One event in full, for `show`.
pub fn detail(e: &DeadEvent) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: &str| out.push_str(&format!("{k:<18} {v}\n"));
    line("id", &e.id.to_string());
    line("event_id", &e.event_id);
    line("event_type", &e.event_type);
    line(
        "aggregate",
        &format!("{}/{}", e.aggregate_type, e.aggregate_id),
    );
    line("topic", e.topic.as_deref().unwrap_or("(source topic)"));
    line("correlation_id", e.correlation_id.as_deref().unwrap_or("-"));
    line(
        "idempotency_token",
        e.idempotency_token.as_deref().unwrap_or("-"),
    );
    line("attempts", &e.retry_count.to_string());
    line("created_at", &e.created_at);
    line("failed_at", &e.failed_at);
    line("error", &e.error);
    if let Some(h) = &e.headers {
        line("headers", &h.to_string());
    }
    if let Some(p) = &e.payload {
        let text = serde_json::to_string_pretty(p).unwrap_or_default();
        line("payload", &text);
    }
    out
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
