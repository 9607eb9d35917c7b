//! `outbox-relay migrate`: applies `migrations/*.sql` to every source's schema, and to
//! every schema matching a `schema_pattern`.
//!
//! The files use unqualified names; each runs with `search_path` set to the source's
//! schema, inside one transaction per schema that also records what it applied in
//! `<schema>.outbox_relay_migrations`. A transaction-scoped advisory lock keeps two
//! migrators (two replicas' init jobs) from racing on one schema.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::config::{PatternSettings, Settings, SourceSettings};
use crate::database::matching_schemas;
use crate::db::quote_ident;

/// One migration file, embedded in the binary.
pub struct Migration {
    /// File name, the migration's version.
    pub version: &'static str,
    /// Its SQL.
    pub sql: &'static str,
}

/// Every migration, in the order they apply.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "000_outbox.sql",
        sql: include_str!("../migrations/000_outbox.sql"),
    },
    Migration {
        version: "001_outbox_enhancements.sql",
        sql: include_str!("../migrations/001_outbox_enhancements.sql"),
    },
    Migration {
        version: "002_outbox_dead_letter.sql",
        sql: include_str!("../migrations/002_outbox_dead_letter.sql"),
    },
    Migration {
        version: "003_outbox_relay_support.sql",
        sql: include_str!("../migrations/003_outbox_relay_support.sql"),
    },
    Migration {
        version: "004_outbox_max_retries_default.sql",
        sql: include_str!("../migrations/004_outbox_max_retries_default.sql"),
    },
    Migration {
        version: "005_outbox_notify_when_waiting.sql",
        sql: include_str!("../migrations/005_outbox_notify_when_waiting.sql"),
    },
];

/// Advisory-lock class shared by the relay's locks (`pg_advisory_lock(class, key)`):
/// a source's lock is `(LOCK_CLASS, hashtext('relay:' || schema))`, a replica's
/// membership `(LOCK_CLASS + 1, slot)`, and a source's waiting lock
/// `(LOCK_CLASS + 2, hashtext(schema))`, which migration 005's trigger tests.
pub const LOCK_CLASS: i32 = 0x0b0c_5e1a_u32 as i32;

/// The advisory-lock class of a source's waiting lock (see migration 005).
pub const WAIT_CLASS: i32 = LOCK_CLASS + 2;

/// What `migrate` did to one schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The source.
    pub source: String,
    /// Versions applied now (empty when the schema was up to date).
    pub versions: Vec<String>,
    /// Columns of the outbox table that contradict the contract, each with its fix.
    pub contradictions: Vec<String>,
}

/// Applies the migrations to every configured source's schema, and to every schema
/// that matches a `schema_pattern` source's pattern: one connection per database URL.
pub async fn migrate_all(settings: &Settings) -> Result<Vec<Applied>> {
    let timeout = settings.operation_timeout;
    let mut by_url: BTreeMap<String, (Vec<&SourceSettings>, Vec<PatternSettings>)> =
        BTreeMap::new();
    for s in &settings.sources {
        by_url
            .entry(s.database_url.pool_key())
            .or_default()
            .0
            .push(s);
    }
    for p in &settings.patterns {
        by_url
            .entry(p.database_url.pool_key())
            .or_default()
            .1
            .push(p.clone());
    }
    let mut out = Vec::new();
    for (fixed, patterns) in by_url.into_values() {
        let url = fixed
            .first()
            .map(|s| &s.database_url)
            .or_else(|| patterns.first().map(|p| &p.database_url))
            .expect("a group has a source or a pattern");
        let (mut client, _notices) = url
            .connect(timeout)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("migrate: connect to {url}"))?;
        for s in fixed {
            out.push(migrate_schema(&mut client, &s.name, &s.schema).await?);
        }
        if patterns.is_empty() {
            continue;
        }
        let found = matching_schemas(&client, &patterns, false, timeout)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("migrate: list the schemas of {url}"))?;
        for schema in found.odd {
            warn!(schema, "schema matches a schema_pattern but its name is not a plain lowercase identifier: not migrated");
        }
        if found.matches.is_empty() {
            let list: Vec<String> = patterns
                .iter()
                .map(|p| p.schema_pattern.to_string())
                .collect();
            warn!(patterns = %list.join(", "), database = %url, "no schema matches: nothing to migrate for these patterns (create the schemas first)");
        }
        for (i, schema) in found.matches {
            let name = patterns[i].source_for(&schema).name;
            out.push(migrate_schema(&mut client, &name, &schema).await?);
        }
    }
    Ok(out)
}

/// Applies the migrations to one source's schema, creating the schema if it is missing.
pub async fn migrate_source(source: &SourceSettings, timeout: Duration) -> Result<Applied> {
    let (mut client, _notices) = source
        .database_url
        .connect(timeout)
        .await
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("migrate source {}", source.name))?;
    migrate_schema(&mut client, &source.name, &source.schema).await
}

/// Applies the migrations to `schema` (of source `name`) over `client`, in one
/// transaction. The schema is created only when it is missing: a role that owns its
/// schema needs no CREATE privilege on the database.
async fn migrate_schema(
    client: &mut tokio_postgres::Client,
    name: &str,
    schema_name: &str,
) -> Result<Applied> {
    let schema = quote_ident(schema_name);
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&LOCK_CLASS, &format!("migrate:{schema_name}")],
    )
    .await
    .context("take the migration lock")?;
    let exists: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema_name],
        )
        .await?
        .get(0);
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
            .await
            .with_context(|| format!("create schema {schema_name}"))?;
    }
    tx.batch_execute(&format!(
        "SET LOCAL search_path TO {schema};
         CREATE TABLE IF NOT EXISTS outbox_relay_migrations (
             version    text PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .with_context(|| format!("prepare schema {schema_name}"))?;
    let done: Vec<String> = tx
        .query("SELECT version FROM outbox_relay_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut versions = Vec::new();
    for m in MIGRATIONS {
        if done.iter().any(|v| v == m.version) {
            continue;
        }
        tx.batch_execute(m.sql)
            .await
            .with_context(|| format!("apply {} to schema {schema_name}", m.version))?;
        tx.execute(
            "INSERT INTO outbox_relay_migrations (version) VALUES ($1)",
            &[&m.version],
        )
        .await?;
        versions.push(m.version.to_string());
    }
    let contradictions = contradictions(&tx, schema_name).await?;
    tx.commit().await?;
    info!(source = %name, schema = %schema_name, applied = ?versions, "schema migrated");
    for c in &contradictions {
        warn!(source = %name, schema = %schema_name, "{c}");
    }
    Ok(Applied {
        source: name.to_string(),
        versions,
        contradictions,
    })
}

/// The columns the relay needs a value in: a row with NULL in one is dead-lettered.
const REQUIRED: &[&str] = &[
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "created_at",
    "retry_count",
];

/// What a table that predates the relay may hold against the contract
/// (migrations/000_outbox.sql): a nullable column the relay needs, and how to fix it.
async fn contradictions(
    tx: &tokio_postgres::Transaction<'_>,
    schema_name: &str,
) -> Result<Vec<String>> {
    let rows = tx
        .query(
            // pg_attribute, not information_schema.columns: 0.05 ms instead of 6.5 ms
            // (with 1.1 ms of planning) per schema, which doubled the migration of
            // 1,001 schemas.
            "SELECT a.attname::text FROM pg_attribute a \
             WHERE a.attrelid = to_regclass(format('%I.outbox', $1::text)) \
             AND a.attnum > 0 AND NOT a.attisdropped AND NOT a.attnotnull \
             AND a.attname = ANY($2::text[]) ORDER BY a.attnum",
            &[&schema_name, &REQUIRED],
        )
        .await
        .context("read the outbox table's columns")?;
    let table = format!("{}.outbox", quote_ident(schema_name));
    let types = tx
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
             WHERE a.attrelid = to_regclass(format('%I.outbox', $1::text)) \
             AND a.attnum > 0 AND NOT a.attisdropped \
             AND ((a.attname = 'id' AND a.atttypid NOT IN ('int8'::regtype, 'int4'::regtype)) \
               OR (a.attname = 'event_id' AND a.atttypid <> 'uuid'::regtype)) \
             ORDER BY a.attnum",
            &[&schema_name],
        )
        .await
        .context("read the outbox table's column types")?;
    let mut out: Vec<String> = types
        .iter()
        .map(|r| {
            let (column, ty): (String, String) = (r.get(0), r.get(1));
            let want = if column == "id" { "bigint" } else { "uuid" };
            format!(
                "{table}.{column} is {ty}, where the contract has {want}: the relay reads it \
                 as {want} and dead-letters a row whose {column} does not convert. Fix: \
                 ALTER TABLE {table} ALTER COLUMN {column} TYPE {want} USING {column}::{want}"
            )
        })
        .collect();
    out.extend(rows.iter().map(|r| {
        let column: String = r.get(0);
        format!(
            "{table}.{column} allows NULL, which the contract forbids: the relay \
                 dead-letters a row whose {column} is NULL. Fix: give such rows a value \
                 (UPDATE {table} SET {column} = ... WHERE {column} IS NULL), then \
                 ALTER TABLE {table} ALTER COLUMN {column} SET NOT NULL"
        )
    }));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trigger_tests_the_lock_the_relay_waits_on() {
        let m = MIGRATIONS
            .iter()
            .find(|m| m.version.starts_with("005"))
            .expect("migration 005");
        assert!(
            m.sql.contains(&format!(
                "pg_try_advisory_xact_lock_shared({WAIT_CLASS}, %s)"
            )),
            "005 must test the class the relay's waiting lock uses ({WAIT_CLASS})"
        );
    }
}
