//! The SQL of one source: claim, delete, retry, dead-letter, and the figures for metrics.
//! Every statement is built once per source with the validated, quoted schema name and
//! prepared once per connection (`prepare_cached`).

use std::time::Duration;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use crate::db::{quote_ident, DbError};
use crate::event::Event;

mod row;

use row::{columns, decode, size_of};

/// How many bytes of payloads one claim reads at most (always at least one row): with
/// `in_flight_batches` claims in flight and one settling, the rows the relay holds stay
/// within a few of these whatever their sizes.
pub const CLAIM_BYTES: i64 = 8 << 20;

/// The columns both tables share, for moving rows between them.
pub const SHARED_COLUMNS: &str =
    "id, event_id, aggregate_type, aggregate_id, event_type, payload, \
     topic, headers, correlation_id, idempotency_token, created_at, status, retry_count, \
     max_retries, last_error, next_attempt_at, published_at";

/// Pending rows counted one by one; a larger backlog is estimated from its ids.
pub const EXACT_PENDING: i64 = 10_000;

/// One source's statements.
#[derive(Debug, Clone)]
pub struct Store {
    claim: ClaimSql,
    /// Built on first use: only `retry.after_dead_letter = "block"` uses it, and each
    /// form is a few KB of text per led source.
    claim_blocking_dead: std::sync::OnceLock<ClaimSql>,
    /// The quoted schema, for building it.
    quoted: String,
    /// The payloads of rows by id, as text.
    payloads: String,
    delete: String,
    retry: String,
    park: String,
    dead_letter_count: String,
    dead_letter_move: String,
    /// Whether a row may be claimed now.
    ready: String,
    stats: String,
    /// This source's figures alone.
    own_stats: String,
}

/// What the outbox and dead-letter tables hold right now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    /// Rows in the outbox.
    pub pending: i64,
    /// Age of the lowest-id row, in seconds (0 when empty).
    pub oldest_age_secs: f64,
    /// Rows in the dead-letter table.
    pub dead_letter_rows: i64,
}

/// The two forms of one claim statement; they return the same rows.
#[derive(Debug, Clone)]
struct ClaimSql {
    /// Leaves out the held ids by list ($3): every held row the index scan meets costs a
    /// heap visit before the filter drops it.
    by_list: String,
    /// Reads only the ids the relay does not hold: below the lowest held id ($3), the
    /// gaps between held ids ($4), above the highest ($5). Three ordered index scans,
    /// merged; the held rows are never visited.
    by_gaps: String,
}

/// Builds both forms of the claim for the quoted schema `s`.
fn claim_sql(s: &str, block_after_dead_letter: bool) -> ClaimSql {
    // A row waiting for its retry holds back its aggregate's later rows.
    let mut filter = format!(
        "(o.next_attempt_at IS NULL OR o.next_attempt_at <= now()) \
         AND NOT EXISTS (SELECT 1 FROM {s}.outbox w \
             WHERE w.next_attempt_at IS NOT NULL AND w.next_attempt_at > now() \
             AND w.aggregate_type = o.aggregate_type AND w.aggregate_id = o.aggregate_id \
             AND w.id < o.id)"
    );
    if block_after_dead_letter {
        filter.push_str(&format!(
            " AND NOT EXISTS (SELECT 1 FROM {s}.outbox_dead_letter d \
                 WHERE d.aggregate_type = o.aggregate_type AND d.aggregate_id = o.aggregate_id \
                 AND d.id < o.id)"
        ));
    }
    // Held rows are left out by id, never by "id > the last id seen", which would skip
    // rows that commit late with a lower id. `inline` is the parameter of the largest
    // payload sent with its row.
    let arm = |ids: &str, inline: &str| {
        format!(
            "SELECT {} FROM {s}.outbox o {} WHERE {ids} AND {filter} ORDER BY o.id LIMIT $1",
            columns(inline),
            size_of(inline),
        )
    };
    ClaimSql {
        by_list: arm("o.id NOT IN (SELECT unnest($3::bigint[]))", "$4"),
        by_gaps: format!(
            "SELECT * FROM (({}) UNION ALL ({}) UNION ALL ({})) c ORDER BY c.id LIMIT $1",
            arm("o.id < $3::bigint", "$6"),
            arm("o.id = ANY($4::bigint[])", "$6"),
            arm("o.id > $5::bigint", "$6"),
        ),
    }
}

/// The ids a claim may return, given the ids the relay holds: everything below
/// `below`, the listed `gaps`, and everything above `above`.
#[derive(Debug, PartialEq)]
struct Complement {
    below: i64,
    gaps: Vec<i64>,
    above: i64,
}

/// Below this many held ids the claim leaves them out by list: skipping a few held rows
/// costs less than starting the gap form's three index scans. A claim of one row with a
/// cached plan took 0.07 ms by list and 0.11-0.19 ms by gaps (`EXPLAIN ANALYZE`), and
/// at 1,000 events/s the relay claims about 700 times a second.
const GAP_FORM_FROM: usize = 64;

impl Complement {
    /// `None` when the list form is the cheaper one: few held ids, or held ids so sparse
    /// that the gaps outnumber them (say, a replayed row with an old id next to new ones).
    fn of(held: &[i64]) -> Option<Complement> {
        if held.len() < GAP_FORM_FROM {
            return None;
        }
        let mut ids = held.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let (lo, hi) = (ids[0], ids[ids.len() - 1]);
        let missing = (hi as i128 - lo as i128 + 1) - ids.len() as i128;
        if missing > ids.len() as i128 {
            return None;
        }
        let mut gaps = Vec::with_capacity(missing as usize);
        for pair in ids.windows(2) {
            gaps.extend(pair[0] + 1..pair[1]);
        }
        Some(Complement {
            below: lo,
            gaps,
            above: hi,
        })
    }
}

impl Store {
    /// Builds the statements for `schema`, which config validation has checked.
    pub fn new(schema: &str) -> Store {
        let s = quote_ident(schema);
        Store {
            claim: claim_sql(&s, false),
            claim_blocking_dead: std::sync::OnceLock::new(),
            quoted: s.clone(),
            payloads: format!("SELECT id::int8, payload::text FROM {s}.outbox WHERE id = ANY($1::bigint[])"),
            delete: format!("DELETE FROM {s}.outbox WHERE id = ANY($1::bigint[])"),
            retry: format!(
                "UPDATE {s}.outbox o SET retry_count = o.retry_count + 1, last_error = u.error, \
                 status = 'retrying', next_attempt_at = now() + u.delay_ms * interval '1 millisecond' \
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, error, delay_ms) \
                 WHERE o.id = u.id"
            ),
            park: format!(
                "UPDATE {s}.outbox o SET last_error = u.error, status = 'dead_letter_full', \
                 next_attempt_at = now() + $3::bigint * interval '1 millisecond' \
                 FROM unnest($1::bigint[], $2::text[]) AS u(id, error) WHERE o.id = u.id"
            ),
            dead_letter_count: format!("SELECT count(*) FROM {s}.outbox_dead_letter"),
            dead_letter_move: format!(
                "WITH f AS (SELECT * FROM unnest($1::bigint[], $2::text[]) AS f(id, error)), \
                 moved AS (DELETE FROM {s}.outbox o USING f WHERE o.id = f.id \
                     RETURNING o.id, o.event_id, o.aggregate_type, o.aggregate_id, o.event_type, \
                     o.payload, o.topic, o.headers, o.correlation_id, o.idempotency_token, \
                     o.created_at, o.retry_count, o.max_retries, o.last_error, o.next_attempt_at, \
                     o.published_at, f.error AS dl_error) \
                 INSERT INTO {s}.outbox_dead_letter ({SHARED_COLUMNS}, failed_at, error) \
                 SELECT id, COALESCE(CASE WHEN event_id::text ~* \
                         '^[0-9a-f]{{8}}-([0-9a-f]{{4}}-){{3}}[0-9a-f]{{12}}$' \
                         THEN event_id::text::uuid END, gen_random_uuid()), \
                     COALESCE(aggregate_type::text, ''), COALESCE(aggregate_id::text, ''), \
                     COALESCE(event_type::text, ''), payload, topic, \
                     headers, correlation_id, idempotency_token, COALESCE(created_at, now()), \
                     'dead', COALESCE(retry_count, 0), \
                     max_retries, last_error, next_attempt_at, published_at, now(), dl_error \
                 FROM moved"
            ),
            // By the primary key, stopping at the first row that may be claimed now.
            ready: format!(
                "(SELECT id FROM {s}.outbox \
                 WHERE next_attempt_at IS NULL OR next_attempt_at <= now() \
                 ORDER BY id LIMIT 1) IS NOT NULL"
            ),
            // Pending rows are counted exactly up to EXACT_PENDING; beyond, the span of
            // pending ids stands for them (an upper bound: ids of rolled-back inserts
            // count too). A full count of a 200,000-row backlog took 165 ms, every
            // refresh, on every replica, while the relay most needs the server.
            stats: format!(
                "(SELECT CASE WHEN c.n <= {EXACT_PENDING} THEN c.n \
                     ELSE GREATEST(c.n, (SELECT max(id) - min(id) + 1 FROM {s}.outbox)) END \
                  FROM (SELECT count(*) AS n FROM (SELECT 1 FROM {s}.outbox \
                      LIMIT {EXACT_PENDING} + 1) l) c), \
                 COALESCE((SELECT EXTRACT(EPOCH FROM now() - created_at)::float8 \
                     FROM {s}.outbox ORDER BY id LIMIT 1), 0), \
                 (SELECT count(*) FROM {s}.outbox_dead_letter)"
            ),
            own_stats: String::new(),
        }
        .with_own_stats()
    }

    fn with_own_stats(mut self) -> Store {
        self.own_stats = format!("SELECT 0::int4, {}", self.stats);
        self
    }

    /// Claims up to `limit` rows in id order, skipping rows waiting for a retry and the
    /// later rows of their aggregates (and, with `block_after_dead_letter`, of aggregates
    /// with a dead-lettered event), and the rows in `exclude` (the ones the relay already
    /// holds). Takes no lock: one relay holds the source at a time.
    ///
    /// Memory is bounded whatever the rows hold: a payload over `max_payload` bytes is
    /// never read (the row comes back as [`Defect::TooLarge`]); payloads up to
    /// [`CLAIM_BYTES`]` / limit` come with their rows; larger ones are measured in SQL
    /// and read apart, and the claim stops before the row that would take the payloads
    /// read past [`CLAIM_BYTES`] (always at least one row): the rows left are claimed
    /// next time.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim<C: GenericClient>(
        &self,
        client: &C,
        limit: i64,
        default_max_retries: i32,
        block_after_dead_letter: bool,
        exclude: &[i64],
        max_payload: i64,
    ) -> Result<Vec<Event>, DbError> {
        let sql = if block_after_dead_letter {
            self.claim_blocking_dead
                .get_or_init(|| claim_sql(&self.quoted, true))
        } else {
            &self.claim
        };
        let inline = (CLAIM_BYTES / limit.max(1)).clamp(1024, max_payload.max(1024)) as i32;
        let pg = |e: tokio_postgres::Error| DbError::pg("claim", &e);
        let rows = match Complement::of(exclude) {
            Some(c) => {
                let stmt = client.prepare_cached(&sql.by_gaps).await.map_err(pg)?;
                client
                    .query(
                        &stmt,
                        &[
                            &limit,
                            &default_max_retries,
                            &c.below,
                            &c.gaps,
                            &c.above,
                            &inline,
                        ],
                    )
                    .await
                    .map_err(pg)?
            }
            None => {
                let stmt = client.prepare_cached(&sql.by_list).await.map_err(pg)?;
                client
                    .query(&stmt, &[&limit, &default_max_retries, &exclude, &inline])
                    .await
                    .map_err(pg)?
            }
        };
        let mut events = Vec::with_capacity(rows.len());
        let mut apart = Vec::new();
        let mut bytes = 0i64;
        for r in &rows {
            let (event, size) = decode(r, max_payload)?;
            let read = if event.defect.is_some() { 0 } else { size };
            // Never fewer than two rows: a claim cut to one row would look like light
            // traffic to the source, which would then wait for a notification that the
            // rows left behind never send.
            if events.len() >= 2 && bytes + read > CLAIM_BYTES {
                break;
            }
            bytes += read;
            if event.defect.is_none() && size > i64::from(inline) {
                apart.push(event.id);
            }
            events.push(event);
        }
        drop(rows);
        if !apart.is_empty() {
            self.read_apart(client, &mut events, &apart).await?;
        }
        Ok(events)
    }

    /// Reads the payloads too large to come with their rows.
    /// A row deleted meanwhile (by hand: only its holder deletes rows) is left out of
    /// the claim, never sent as a tombstone for want of its payload.
    async fn read_apart<C: GenericClient>(
        &self,
        client: &C,
        events: &mut Vec<Event>,
        ids: &[i64],
    ) -> Result<(), DbError> {
        let pg = |e: tokio_postgres::Error| DbError::pg("claim: read large payloads", &e);
        let stmt = client.prepare_cached(&self.payloads).await.map_err(pg)?;
        let mut read = std::collections::HashSet::with_capacity(ids.len());
        for row in client.query(&stmt, &[&ids]).await.map_err(pg)? {
            let id: i64 = row.try_get(0).map_err(pg)?;
            if let Some(e) = events.iter_mut().find(|e| e.id == id) {
                e.payload = row.try_get(1).map_err(pg)?;
                read.insert(id);
            }
        }
        if read.len() < ids.len() {
            // Rows after a missing one stay too: they are claimed again next time, in order.
            if let Some(cut) = events
                .iter()
                .position(|e| ids.contains(&e.id) && !read.contains(&e.id))
            {
                events.truncate(cut);
            }
        }
        Ok(())
    }

    /// Deletes delivered rows, `chunk` ids per statement.
    pub async fn delete<C: GenericClient>(
        &self,
        client: &C,
        ids: &[i64],
        chunk: usize,
    ) -> Result<u64, DbError> {
        let pg = |e: tokio_postgres::Error| DbError::pg("delete delivered rows", &e);
        let stmt = client.prepare_cached(&self.delete).await.map_err(pg)?;
        // The chunks go out pipelined on the connection: one round trip, not one per chunk.
        let stmt = &stmt;
        let counts = futures::future::try_join_all(
            ids.chunks(chunk.max(1))
                .map(|part| async move { client.execute(stmt, &[&part]).await }),
        )
        .await
        .map_err(pg)?;
        Ok(counts.into_iter().sum())
    }

    /// Records a failed attempt of each row: retry count up, error kept, next attempt
    /// after its delay.
    pub async fn record_retries<C: GenericClient>(
        &self,
        client: &C,
        ids: &[i64],
        errors: &[String],
        delays: &[Duration],
    ) -> Result<u64, DbError> {
        let pg = |e: tokio_postgres::Error| DbError::pg("record retries", &e);
        let stmt = client.prepare_cached(&self.retry).await.map_err(pg)?;
        let delays: Vec<i64> = delays.iter().map(|d| d.as_millis() as i64).collect();
        client
            .execute(&stmt, &[&ids, &errors, &delays])
            .await
            .map_err(pg)
    }

    /// Moves rows to the dead-letter table, atomically, as far as `capacity` allows.
    /// Rows that do not fit stay in the outbox, parked for `park_for`. Returns how many
    /// moved and how many were parked.
    pub async fn dead_letter(
        &self,
        client: &mut deadpool_postgres::Client,
        ids: &[i64],
        errors: &[String],
        capacity: i64,
        park_for: Duration,
    ) -> Result<(u64, u64), DbError> {
        self.dead_letter_tx(client, ids, errors, capacity, park_for)
            .await
            .map_err(|e| DbError::pg("dead-letter", &e))
    }

    async fn dead_letter_tx(
        &self,
        client: &mut deadpool_postgres::Client,
        ids: &[i64],
        errors: &[String],
        capacity: i64,
        park_for: Duration,
    ) -> Result<(u64, u64), tokio_postgres::Error> {
        let count_stmt = client.prepare_cached(&self.dead_letter_count).await?;
        let move_stmt = client.prepare_cached(&self.dead_letter_move).await?;
        let park_stmt = client.prepare_cached(&self.park).await?;
        let tx = client.transaction().await?;
        let used: i64 = tx.query_one(&count_stmt, &[]).await?.get(0);
        let room = (capacity - used).clamp(0, ids.len() as i64) as usize;
        let moved = if room > 0 {
            tx.execute(&move_stmt, &[&&ids[..room], &&errors[..room]])
                .await?
        } else {
            0
        };
        let mut parked = 0;
        if room < ids.len() {
            let errs: Vec<String> = errors[room..]
                .iter()
                .map(|e| {
                    format!("dead-letter table full ({used} of {capacity} rows); not moved: {e}")
                })
                .collect();
            let park_ms = park_for.as_millis() as i64;
            parked = tx
                .execute(&park_stmt, &[&&ids[room..], &errs, &park_ms])
                .await?;
        }
        tx.commit().await?;
        Ok((moved, parked))
    }

    /// Counts for metrics and health.
    pub async fn stats<C: GenericClient>(&self, client: &C) -> Result<Stats, DbError> {
        let pg = |e: tokio_postgres::Error| DbError::pg("stats", &e);
        let stmt = client.prepare_cached(&self.own_stats).await.map_err(pg)?;
        let row = client.query_one(&stmt, &[]).await.map_err(pg)?;
        Stats::of(&row)
    }

    /// Every statement it prepares on a pooled connection.
    pub fn statements(&self) -> Vec<&str> {
        let mut all = vec![
            self.claim.by_list.as_str(),
            &self.claim.by_gaps,
            &self.delete,
            &self.retry,
            &self.park,
            &self.dead_letter_count,
            &self.dead_letter_move,
            &self.own_stats,
            &self.payloads,
        ];
        if let Some(c) = self.claim_blocking_dead.get() {
            all.extend([c.by_list.as_str(), &c.by_gaps]);
        }
        all
    }

    /// One statement that returns the index of each store in `stores` with a row to
    /// claim now (the look that wakes idle sources).
    pub fn ready_of_all(stores: &[&Store]) -> String {
        stores
            .iter()
            .enumerate()
            .map(|(i, s)| format!("SELECT {i}::int4 WHERE {}", s.ready))
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    }

    /// One statement for the counts of every store in `stores`, one row each, tagged
    /// with its index.
    pub fn stats_of_all(stores: &[&Store]) -> String {
        stores
            .iter()
            .enumerate()
            .map(|(i, s)| format!("SELECT {i}::int4, {}", s.stats))
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    }
}

impl Stats {
    /// A row of [`Store::stats_of_all`]: (index, pending, oldest age, dead-letter rows).
    pub fn of(row: &Row) -> Result<Stats, DbError> {
        let pg = |e: tokio_postgres::Error| DbError::pg("stats", &e);
        Ok(Stats {
            pending: row.try_get(1).map_err(pg)?,
            oldest_age_secs: row.try_get(2).map_err(pg)?,
            dead_letter_rows: row.try_get(3).map_err(pg)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Complement, Store, GAP_FORM_FROM};

    #[test]
    fn the_figures_of_a_databases_sources_are_one_statement() {
        let (a, b, c) = (Store::new("a"), Store::new("b"), Store::new("c"));
        let sql = Store::stats_of_all(&[&a, &b, &c]);
        assert_eq!(sql.matches(" UNION ALL ").count(), 2, "{sql}");
        for (i, s) in ["\"a\"", "\"b\"", "\"c\""].iter().enumerate() {
            assert!(
                sql.contains(&format!("SELECT {i}::int4, (SELECT CASE WHEN c.n <= 10000"))
                    && sql.contains(&format!("FROM {s}.outbox LIMIT 10000 + 1")),
                "{sql}"
            );
        }
    }

    /// `n` held ids from `first`, skipping the ids in `skip`.
    fn held(first: i64, n: usize, skip: &[i64]) -> Vec<i64> {
        (first..).filter(|i| !skip.contains(i)).take(n).collect()
    }

    #[test]
    fn complement_lists_the_gaps_between_held_ids() {
        let mut ids = held(100, GAP_FORM_FROM, &[103, 104, 110]);
        ids.reverse();
        ids.push(101);
        let c = Complement::of(&ids).expect("the gap form");
        assert_eq!(c.below, 100);
        assert_eq!(c.gaps, vec![103, 104, 110]);
        assert_eq!(c.above, 100 + GAP_FORM_FROM as i64 + 2);
        let c = Complement::of(&held(5, GAP_FORM_FROM, &[])).unwrap();
        assert_eq!(
            (c.below, c.gaps, c.above),
            (5, vec![], 4 + GAP_FORM_FROM as i64)
        );
    }

    #[test]
    fn few_or_sparse_held_ids_are_left_out_by_list() {
        assert_eq!(Complement::of(&[]), None);
        assert_eq!(Complement::of(&held(1, GAP_FORM_FROM - 1, &[])), None);
        // One old id next to new ones: the gap would be a million ids long.
        let mut ids = held(1_000_000, GAP_FORM_FROM, &[]);
        ids.push(5);
        assert_eq!(Complement::of(&ids), None);
        let mut ids = held(0, GAP_FORM_FROM, &[]);
        ids.extend([i64::MIN, i64::MAX]);
        assert_eq!(Complement::of(&ids), None);
        // As many gaps as held ids is still the gap form.
        let every_other: Vec<i64> = (0..GAP_FORM_FROM as i64).map(|i| 2 * i).collect();
        assert!(Complement::of(&every_other).is_some());
    }
}
