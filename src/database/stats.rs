//! The gauges of each source (pending rows, the oldest one's age, dead-letter fill) and
//! of the database (pool, connections, sources), refreshed on a timer rather than per
//! scrape: one statement per 32 sources of a database (`PER_STATEMENT`). Errors are
//! logged once per outage and counted per source.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::db::DbError;
use crate::source::outage::Problem;
use crate::source::store::{Stats, Store};
use crate::source::Source;

use super::{Cached, Database, PER_STATEMENT};

/// What the stats refresh keeps between rounds.
#[derive(Default)]
pub(super) struct StatsLook {
    statements: Cached,
    /// Per source, the refresh's outage.
    outages: std::collections::HashMap<String, crate::source::outage::Outage>,
}

/// Whether a failed statement over many sources may be one source's tables' fault
/// (so each source is asked alone), not the server's or the pool's.
fn blames_a_table(e: &DbError) -> bool {
    use crate::db::DbErrorKind as K;
    matches!(e.kind(), K::Schema | K::Permission | K::Row | K::Other)
}

impl Database {
    /// The figures of the sources this replica leads, and of those nobody leads,
    /// [`PER_STATEMENT`] sources a statement; if one fails for what a source's tables
    /// may be to blame for (say a schema is not migrated yet), each of its sources on
    /// its own, so the others still show theirs. A source another replica leads shows
    /// zeros here (its leader shows its figures: `max by (source)`), so the refresh
    /// costs the server what this replica's share does, not every source again per
    /// replica; a source nobody leads shows its backlog on every replica, so a stalled
    /// one is seen. A disabled relay leads nothing and shows every source's.
    pub(super) async fn refresh_stats(&self, look: &mut StatsLook) {
        self.show_connections();
        let (sources, followed): (Vec<_>, Vec<_>) = self.sources().into_iter().partition(|s| {
            s.health.is_leader()
                || !self.relay.enabled
                || self.coordinator.led_by_anyone(&s.settings.schema) != Some(true)
        });
        for s in &followed {
            shown(look, s, Ok(Stats::default()));
        }
        let timeout = self.relay.operation_timeout;
        let mut used = Vec::new();
        for chunk in sources.chunks(PER_STATEMENT) {
            let owned: Vec<Arc<Store>> = chunk.iter().map(|s| s.store()).collect();
            let stores: Vec<&Store> = owned.iter().map(|s| s.as_ref()).collect();
            let sql = Store::stats_of_all(&stores);
            let rows = self.query(&sql, "stats", timeout).await;
            used.push(sql);
            let rows = match rows {
                Ok(rows) if rows.len() == chunk.len() => rows,
                Ok(rows) if chunk.len() == 1 => {
                    let n = rows.len();
                    let e = DbError::other("stats", format!("{n} rows for 1 source"));
                    shown(look, &chunk[0], Err(e));
                    continue;
                }
                Err(e) if chunk.len() == 1 => {
                    shown(look, &chunk[0], Err(e));
                    continue;
                }
                Err(e) if !blames_a_table(&e) => {
                    // Down, slow or out of connections: every source's refresh would
                    // wait as long again.
                    for s in chunk {
                        shown(look, s, Err(e.clone()));
                    }
                    continue;
                }
                Ok(_) | Err(_) => {
                    for s in chunk {
                        let r = self.own_stats(s).await;
                        shown(look, s, r);
                    }
                    continue;
                }
            };
            for row in rows {
                let i = row.try_get::<_, i32>(0).map(|i| i as usize);
                if let Ok(i) = i {
                    if let Some(s) = chunk.get(i) {
                        shown(look, s, Stats::of(&row));
                    }
                }
            }
        }
        look.statements.keep(&self.pool, used);
    }

    /// Reads one source's figures alone.
    async fn own_stats(&self, s: &Source) -> Result<Stats, DbError> {
        let timeout = self.relay.operation_timeout;
        tokio::time::timeout(timeout, async {
            let c = self
                .pool
                .get()
                .await
                .map_err(|e| DbError::pool("stats: pool", &e, timeout))?;
            s.store().stats(&c).await
        })
        .await
        .map_err(|_| DbError::timed_out("stats", timeout))?
    }

    /// What this replica holds of the database: the pool's connections, the
    /// coordination connection, and its sources.
    pub fn show_connections(&self) {
        let db = self.label.as_str();
        let status = self.pool.status();
        let m = &self.metrics;
        for (state, n) in [
            ("open", status.size),
            ("idle", status.available),
            ("in_use", status.size.saturating_sub(status.available)),
            ("waiting", status.waiting),
        ] {
            m.pool_connections
                .with_label_values(&[db, state])
                .set(n as i64);
        }
        let coordination = self.coordinator.status();
        m.connections
            .with_label_values(&[db])
            .set((status.size + coordination.up as usize) as i64);
        m.sources
            .with_label_values(&[db])
            .set(coordination.sources as i64);
    }
}

/// Shows a source's figures, or notes its error (logged once per outage).
fn shown(look: &mut StatsLook, s: &Source, r: Result<Stats, DbError>) {
    let name = s.name();
    let outage = look.outages.entry(name.to_string()).or_default();
    match r {
        Ok(st) => {
            let m = &s.metrics;
            m.pending.with_label_values(&[name]).set(st.pending);
            m.oldest_pending_age
                .with_label_values(&[name])
                .set(st.oldest_age_secs);
            m.dead_letter_rows
                .with_label_values(&[name])
                .set(st.dead_letter_rows);
            s.health.pending.store(st.pending, Ordering::Relaxed);
            s.health
                .dead_letter_rows
                .store(st.dead_letter_rows, Ordering::Relaxed);
            outage.recovered(name);
        }
        Err(e) => {
            s.metrics.stats_errors.with_label_values(&[name]).inc();
            // The gauges keep their last figures; the pause is the timer's.
            let _ = outage.failed(
                name,
                Problem::of(&e).stats(),
                &e.to_string(),
                Duration::ZERO,
            );
        }
    }
}
