//! Sources by pattern: the schemas of a database whose names match a `[[sources]]`
//! entry's `schema_pattern`. `run` relays those that hold an outbox table (listed at
//! start and every `discovery_interval`); `migrate` migrates every match.

use std::time::Duration;

use tokio_postgres::GenericClient;

use crate::config::{is_identifier, PatternSettings};
use crate::db::DbError;

/// Schemas matching any of the `LIKE` patterns, with an outbox table if `with_outbox`.
const MATCHING: &str = "SELECT n.nspname::text FROM pg_namespace n \
     WHERE n.nspname LIKE ANY ($1::text[]) \
     AND (NOT $2 OR EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid \
         AND c.relname = 'outbox' AND c.relkind IN ('r', 'p'))) \
     ORDER BY 1";

/// What a look for matching schemas found.
#[derive(Debug, Default)]
pub struct Found {
    /// Each matching schema, with the index of the first pattern it matches, in name order.
    pub matches: Vec<(usize, String)>,
    /// Schemas that match but whose names are not plain lowercase identifiers, which
    /// the relay does not relay (their callers say so once).
    pub odd: Vec<String>,
}

/// The schemas of the database matching `patterns`; with `with_outbox`, only those
/// holding an outbox table.
pub async fn matching_schemas<C: GenericClient>(
    client: &C,
    patterns: &[PatternSettings],
    with_outbox: bool,
    timeout: Duration,
) -> Result<Found, DbError> {
    let likes: Vec<String> = patterns.iter().map(|p| p.schema_pattern.like()).collect();
    let rows = tokio::time::timeout(timeout, client.query(MATCHING, &[&likes, &with_outbox]))
        .await
        .map_err(|_| DbError::timed_out("list schemas", timeout))?
        .map_err(|e| DbError::pg("list schemas", &e))?;
    let mut out = Found::default();
    for r in rows {
        let schema: String = r.try_get(0).map_err(|e| DbError::pg("list schemas", &e))?;
        let Some(i) = patterns
            .iter()
            .position(|p| p.schema_pattern.matches(&schema))
        else {
            continue;
        };
        if is_identifier(&schema) {
            out.matches.push((i, schema));
        } else {
            out.odd.push(schema);
        }
    }
    Ok(out)
}
