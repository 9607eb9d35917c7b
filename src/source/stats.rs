//! The gauges of each source (pending rows, the oldest one's age, dead-letter fill),
//! refreshed on a timer rather than per scrape, with errors logged once per outage.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db::DbError;

use super::outage::{Outage, Problem};
use super::Source;

impl Source {
    /// Reads the source's figures into its gauges and health.
    pub async fn refresh_stats(&self) -> Result<(), DbError> {
        let timeout = self.relay.operation_timeout;
        let st = tokio::time::timeout(timeout, async {
            let c = self
                .pool
                .get()
                .await
                .map_err(|e| DbError::pool("stats: pool", &e, timeout))?;
            self.store.stats(&c).await
        })
        .await
        .map_err(|_| DbError::timed_out("stats", timeout))??;
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
        Ok(())
    }
}

/// Refreshes every source's figures each `every` until `cancel`.
pub async fn refresh_stats(sources: Vec<Arc<Source>>, every: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outages: Vec<Outage> = sources.iter().map(|_| Outage::new()).collect();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cancel.cancelled() => return,
        }
        for (s, outage) in sources.iter().zip(outages.iter_mut()) {
            match s.refresh_stats().await {
                Ok(()) => outage.recovered(s.name()),
                Err(e) => {
                    // The gauges keep their last figures; the pause is the timer's.
                    let _ = outage.failed(s.name(), Problem::of(&e).stats(), &e.to_string(), every);
                }
            }
        }
    }
}
