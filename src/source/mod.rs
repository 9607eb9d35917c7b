//! One outbox source: win the source's lock, then claim, publish, settle, repeat.
//!
//! Invariants:
//! - no row lock and no open transaction is held while waiting for Kafka;
//! - one relay process works a source at a time (a session advisory lock, held on its
//!   database's coordination connection, `crate::database`); whoever holds it reads the
//!   lowest pending ids, never "after the last id seen", so rows that commit late are
//!   not skipped;
//! - a row leaves the outbox only after Kafka acknowledged it, or into the dead-letter
//!   table in the same transaction that deletes it;
//! - cancellation is checked between batches, never between "publish" and "settle".
//!
//! The way of one event: `store.rs` claims it, `pipeline.rs` hands it to the sink
//! (`crate::sink`) and files what Kafka said, `holds.rs` keeps its aggregate's later
//! events back if it failed, `settle.rs` decides retry or dead letter and deletes,
//! `outage.rs` logs what is down. Who leads the source, and what wakes it when idle,
//! is its database's business (`crate::database`).

mod holds;
pub(crate) mod outage;
mod pipeline;
mod settle;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{AfterDeadLetter, Settings, SourceSettings, Wakeup};
use crate::database::{show_leader, Coordinator};
use crate::db::DbError;
use crate::event::Event;
use crate::health::SourceHealth;
use crate::metrics::Metrics;
use crate::sink::{Outgoing, Sink};

use outage::Outage;
pub use pipeline::Ended;
use pipeline::{lead, Landed, Limits, Observers, Pipeline, Ports, SettleOutcome};
use settle::Settler;
use store::Store;

/// How long a source that gave itself up for want of a connection leaves its lock to
/// the other replicas before asking for it again.
const GIVE_UP_PAUSE: Duration = Duration::from_secs(5);

/// Fault injection for tests (cargo feature `test-hooks`, which the integration tests
/// turn on): compiled out of the relay that ships.
#[cfg(feature = "test-hooks")]
#[derive(Debug, Default)]
pub struct TestHooks {
    /// While set, the source's task stops making progress.
    pub stall: std::sync::atomic::AtomicBool,
    /// When set, the source's task panics once at its next claim.
    pub panic_once: std::sync::atomic::AtomicBool,
}

/// Everything one source's task needs.
pub struct Source {
    /// Its settings.
    pub settings: SourceSettings,
    /// The pool of its database (shared with sources of the same database).
    pub pool: Pool,
    /// The coordination connection of its database (shared likewise).
    pub coordinator: Arc<Coordinator>,
    /// Its SQL, built when this replica leads it, dropped when the lead ends.
    store: std::sync::Mutex<Option<Arc<Store>>>,
    /// Its visible state.
    pub health: Arc<SourceHealth>,
    /// The relay-wide settings.
    pub relay: Arc<Settings>,
    /// The shared producer.
    pub sink: Arc<Sink>,
    /// The shared metrics.
    pub metrics: Arc<Metrics>,
    name: Arc<str>,
    topic: Arc<str>,
    /// `ce_source` when its records are CloudEvents.
    cloudevents: Option<Arc<str>>,
    /// Fault injection for tests.
    #[cfg(feature = "test-hooks")]
    pub hooks: Arc<TestHooks>,
}

impl Source {
    /// A source of `settings` in the database behind `pool`.
    pub fn new(
        settings: SourceSettings,
        pool: Pool,
        coordinator: Arc<Coordinator>,
        relay: Arc<Settings>,
        sink: Arc<Sink>,
        metrics: Arc<Metrics>,
    ) -> Source {
        Source {
            store: std::sync::Mutex::new(None),
            name: settings.name.as_str().into(),
            topic: settings.topic.as_str().into(),
            cloudevents: (settings.record_format == crate::config::RecordFormat::CloudEvents)
                .then(|| settings.cloudevents_source.as_str().into()),
            settings,
            pool,
            coordinator,
            health: Arc::new(SourceHealth::new()),
            relay,
            sink,
            metrics,
            #[cfg(feature = "test-hooks")]
            hooks: Arc::default(),
        }
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its statements, built on first use: a source this replica does not lead costs
    /// no SQL text.
    pub fn store(&self) -> Arc<Store> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store
            .get_or_insert_with(|| Arc::new(Store::new(&self.settings.schema)))
            .clone()
    }

    /// A lead ended: the source's statements leave the pool's caches, and with them
    /// their prepared plans on the server, until it leads the source again.
    fn forget_statements(&self) {
        let store = self.store.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(store) = store {
            let caches = &self.pool.manager().statement_caches;
            for sql in store.statements() {
                caches.remove(sql, &[]);
            }
        }
    }

    /// Runs the source until `cancel`: wait for its database's coordinator to give it
    /// the lock, lead, and when that ends wait again.
    pub async fn run(&self, cancel: CancellationToken) {
        let mut db_outage = Outage::new();
        loop {
            self.health.beat();
            if cancel.is_cancelled() {
                return;
            }
            if !self.relay.enabled {
                // Disabled: publish nothing and take no lock, so an enabled relay on the
                // same source (a rollout, a rollback) is never blocked by this one.
                self.health.park(true);
                cancel.cancelled().await;
                return;
            }
            self.health.park(true);
            let mut leadership = tokio::select! {
                l = self.coordinator.lead(&self.settings.schema) => l,
                _ = cancel.cancelled() => return,
            };
            self.health.park(false);
            db_outage.recovered(self.name());
            self.show_up(true);
            show_leader(&self.health, &self.metrics, self.name(), true);
            info!(source = self.name(), "holding the source");
            let p = Pipeline::new(self, self.limits(), self.observers(), &mut db_outage);
            let ended = lead(p, &mut leadership.notices, &cancel).await;
            show_leader(&self.health, &self.metrics, self.name(), false);
            drop(leadership);
            self.forget_statements();
            match ended {
                Ended::Cancelled => {
                    info!(source = self.name(), "released the source");
                    return;
                }
                Ended::HandedOver => {
                    self.metrics
                        .handovers
                        .with_label_values(&[self.name()])
                        .inc();
                    info!(
                        source = self.name(),
                        "handed the source over: another replica takes its share"
                    );
                }
                Ended::NoConnection => {
                    self.metrics.gave_up.with_label_values(&[self.name()]).inc();
                    warn!(
                        source = self.name(),
                        pool_size = self.relay.pool_size,
                        "gave the source up: no pooled connection was free for its claim; another replica may take it"
                    );
                    self.health.set_error(
                        "gave the source up: no pooled connection free within operation_timeout (raise pool_size?)",
                    );
                    // Long enough for a replica with room to take it first.
                    self.health.park(true);
                    if wait(&cancel, GIVE_UP_PAUSE).await {
                        return;
                    }
                }
                Ended::LostLock(why) => {
                    warn!(source = self.name(), error = %why, "lost the source's lock; waiting to lead it again");
                    self.health.set_error(format!("lost lock: {why}"));
                }
            }
        }
    }

    /// After the task panicked: this replica no longer leads the source (the lock's
    /// connection went with the task), the restart is counted, and the panic shown.
    pub fn reset_after_panic(&self, panic: &str) {
        show_leader(&self.health, &self.metrics, self.name(), false);
        self.metrics
            .task_restarts
            .with_label_values(&[self.name()])
            .inc();
        self.health.set_error(format!("task panicked: {panic}"));
    }

    fn show_up(&self, up: bool) {
        self.metrics
            .source_up
            .with_label_values(&[self.name()])
            .set(up as i64);
    }

    fn limits(&self) -> Limits {
        Limits {
            batch_size: self.relay.batch_size,
            max_batch_size: self.relay.max_batch_size,
            announce: self.relay.wakeup == Wakeup::Notify,
            in_flight: self.relay.in_flight_batches,
            delete_batch_size: self.relay.delete_batch_size,
            retry: self.relay.retry.clone(),
        }
    }

    fn observers(&self) -> Observers<'_> {
        Observers {
            name: &self.name,
            schema: &self.settings.schema,
            metrics: &self.metrics,
            health: &self.health,
            #[cfg(feature = "test-hooks")]
            hooks: &self.hooks,
        }
    }
}

/// The real ports: PostgreSQL through the pool, Kafka through the sink.
impl Ports for Source {
    type Batch = Outgoing;

    fn claim(
        &self,
        limit: usize,
        exclude: Vec<i64>,
    ) -> BoxFuture<'static, Result<Vec<Event>, DbError>> {
        let timeout = self.relay.operation_timeout;
        let pool = self.pool.clone();
        let store = self.store();
        let limit = limit as i64;
        let max_retries = self.relay.max_retries;
        let block = self.relay.retry.after_dead_letter == AfterDeadLetter::Block;
        let max_payload = self.relay.kafka.message_max_bytes();
        let task = tokio::spawn(async move {
            // The wait for a connection is the pool's own (operation_timeout), so a pool
            // with none free says so, apart from a slow statement.
            let client = pool
                .get()
                .await
                .map_err(|e| DbError::pool("claim: pool", &e, timeout))?;
            tokio::time::timeout(
                timeout,
                store.claim(&client, limit, max_retries, block, &exclude, max_payload),
            )
            .await
            .map_err(|_| DbError::timed_out("claim", timeout))?
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(DbError::other("claim task", e.to_string())))
        }
        .boxed()
    }

    fn batch(&self) -> Outgoing {
        self.sink.outgoing(
            self.name.clone(),
            self.topic.clone(),
            self.cloudevents.clone(),
        )
    }

    fn wait_for_rows(&self) -> BoxFuture<'static, Result<bool, DbError>> {
        let coordinator = self.coordinator.clone();
        let schema = self.settings.schema.clone();
        async move { coordinator.wait_for_rows(&schema).await }.boxed()
    }

    fn stop_waiting(&self) {
        self.coordinator.stop_waiting(&self.settings.schema);
    }

    fn settle(&self, landed: Vec<Landed>) -> BoxFuture<'static, SettleOutcome> {
        let name = self.name.clone();
        let pool = self.pool.clone();
        let store = self.store();
        let metrics = self.metrics.clone();
        let health = self.health.clone();
        let relay = self.relay.clone();
        async move {
            let settler = Settler {
                name: &name,
                pool: &pool,
                store: &store,
                // A batch is deleted in one statement, however large the claims grew.
                delete_chunk: relay
                    .delete_batch_size
                    .max(landed.iter().map(|l| l.batch.len()).max().unwrap_or(0)),
                dead_letter_size: relay.dead_letter_size,
                park_for: relay.retry.backoff_max,
                timeout: relay.operation_timeout,
                metrics: &metrics,
                health: &health,
            };
            let r = settler
                .settle(landed.iter().map(|l| (&l.batch[..], &l.settlement)))
                .await;
            (landed, r)
        }
        .boxed()
    }
}

/// Sleeps for `d` unless cancelled first; returns true when cancelled.
async fn wait(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = cancel.cancelled() => true,
    }
}
