//! The gauges of each source (pending rows, the oldest one's age, dead-letter fill),
//! refreshed on a timer rather than per scrape: one statement per database for all of
//! its sources. Errors are logged once per outage and counted per source.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::DbError;

use super::outage::{Outage, Problem};
use super::store::{Stats, Store};
use super::Source;

impl Source {
    /// Shows the source's figures in its gauges and health.
    fn show_stats(&self, st: Stats) {
        let name = self.name();
        self.metrics
            .pending
            .with_label_values(&[name])
            .set(st.pending);
        self.metrics
            .oldest_pending_age
            .with_label_values(&[name])
            .set(st.oldest_age_secs);
        self.metrics
            .dead_letter_rows
            .with_label_values(&[name])
            .set(st.dead_letter_rows);
        self.health.pending.store(st.pending, Ordering::Relaxed);
        self.health
            .dead_letter_rows
            .store(st.dead_letter_rows, Ordering::Relaxed);
    }

    /// Reads this source's figures alone.
    async fn own_stats(&self) -> Result<Stats, DbError> {
        let timeout = self.relay.operation_timeout;
        tokio::time::timeout(timeout, async {
            let c = self
                .pool
                .get()
                .await
                .map_err(|e| DbError::pool("stats: pool", &e, timeout))?;
            self.store.stats(&c).await
        })
        .await
        .map_err(|_| DbError::timed_out("stats", timeout))?
    }
}

/// The sources of one database, read together.
struct Database {
    sources: Vec<Arc<Source>>,
    /// Their figures in one statement.
    sql: String,
    outages: Vec<Outage>,
}

impl Database {
    /// Every source's figures in one statement; if that fails (say one schema is not
    /// migrated yet), each source's on its own, so the others still show theirs.
    async fn refresh(&mut self) {
        let Some(first) = self.sources.first() else {
            return;
        };
        let db = first.settings.database_url.identity();
        let status = first.pool.status();
        let m = &first.metrics;
        for (state, n) in [
            ("open", status.size),
            ("idle", status.available),
            ("waiting", status.waiting),
        ] {
            m.pool_connections
                .with_label_values(&[&db, state])
                .set(n as i64);
        }
        if let Some(r) = first.coordinator.members() {
            m.replicas.with_label_values(&[&db]).set(r as i64);
        }
        let timeout = first.relay.operation_timeout;
        let all = tokio::time::timeout(timeout, async {
            let c = first
                .pool
                .get()
                .await
                .map_err(|e| DbError::pool("stats: pool", &e, timeout))?;
            let stmt = c
                .prepare_cached(&self.sql)
                .await
                .map_err(|e| DbError::pg("stats", &e))?;
            c.query(&stmt, &[])
                .await
                .map_err(|e| DbError::pg("stats", &e))
        })
        .await
        .map_err(|_| DbError::timed_out("stats", timeout))
        .and_then(|r| r);
        let rows = match all {
            Ok(rows) if rows.len() == self.sources.len() => rows,
            Ok(_) | Err(_) if self.sources.len() > 1 => {
                for i in 0..self.sources.len() {
                    let r = self.sources[i].clone().own_stats().await;
                    self.shown(i, r);
                }
                return;
            }
            Ok(rows) => {
                let n = rows.len();
                self.shown(
                    0,
                    Err(DbError::other("stats", format!("{n} rows for 1 source"))),
                );
                return;
            }
            Err(e) => {
                self.shown(0, Err(e));
                return;
            }
        };
        for row in rows {
            let i = row.try_get::<_, i32>(0).map(|i| i as usize);
            match i {
                Ok(i) if i < self.sources.len() => {
                    let r = Stats::of(&row);
                    self.shown(i, r);
                }
                _ => {}
            }
        }
    }

    /// Shows source `i`'s figures, or notes its error (logged once per outage).
    fn shown(&mut self, i: usize, r: Result<Stats, DbError>) {
        let s = &self.sources[i];
        match r {
            Ok(st) => {
                s.show_stats(st);
                self.outages[i].recovered(s.name());
            }
            Err(e) => {
                s.metrics.stats_errors.with_label_values(&[s.name()]).inc();
                // The gauges keep their last figures; the pause is the timer's.
                let _ = self.outages[i].failed(
                    s.name(),
                    Problem::of(&e).stats(),
                    &e.to_string(),
                    Duration::ZERO,
                );
            }
        }
    }
}

/// Refreshes every source's figures each `every` until `cancel`.
pub async fn refresh_stats(sources: Vec<Arc<Source>>, every: Duration, cancel: CancellationToken) {
    let mut dbs: Vec<Database> = Vec::new();
    for s in sources {
        match dbs
            .iter_mut()
            .find(|d| Arc::ptr_eq(&d.sources[0].coordinator, &s.coordinator))
        {
            Some(d) => d.sources.push(s),
            None => dbs.push(Database {
                sources: vec![s],
                sql: String::new(),
                outages: Vec::new(),
            }),
        }
    }
    for d in &mut dbs {
        let stores: Vec<&Store> = d.sources.iter().map(|s| s.store.as_ref()).collect();
        d.sql = Store::stats_of_all(&stores);
        d.outages = d.sources.iter().map(|_| Outage::new()).collect();
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        for d in &mut dbs {
            d.refresh().await;
        }
    }
}
