//! One database the relay serves, and everything it does there once, for all of its
//! sources: the coordination connection ([`Coordinator`]: locks, wake-ups, replicas),
//! the pool for claims, settles and stats, the sources found by `schema_pattern`, the
//! look for pending rows that wakes idle sources, and the stats refresh.
//!
//! What the relay costs the server grows with the databases, not the sources: per
//! replica, `1 + pool_size` connections; per `process_interval`, one statement to find
//! the sources with rows to claim; per `health.refresh_interval`, one statement for
//! every source's figures; per `discovery_interval`, one to list matching schemas; per
//! second, the coordinator's look at `pg_locks`. An idle source runs no statement and
//! no timer of its own.

mod coordinator;
mod discovery;
mod stats;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use deadpool_postgres::Pool;
use futures::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{PatternSettings, Settings, SourceSettings};
use crate::db::{DatabaseUrl, DbError};
use crate::metrics::Metrics;
use crate::sink::Sink;
use crate::source::outage::{Outage, Problem};
use crate::source::store::Store;
use crate::source::Source;

pub use coordinator::{group_of, show_leader, CoordinationStatus, Coordinator, Leadership};
pub use discovery::{matching_schemas, Found};

/// Sources per statement of a periodic look (pending rows, figures). A statement over
/// every source of a database would lock every outbox and dead-letter table and their
/// indexes at once: at 1,000 sources about 9,000 entries of the server's lock table
/// (sized `max_locks_per_transaction * max_connections`, 6,400 by default), and the
/// services' own statements failed with "out of shared memory". 32 sources take about
/// 300, 16 of them in the backend's fast path.
pub const PER_STATEMENT: usize = 32;

/// A pooled connection unused this long is closed: a burst (a takeover, a backlog)
/// opens up to `pool_size`, and the quiet that follows needs one.
pub const POOL_IDLE: Duration = Duration::from_secs(60);
/// A pooled connection is closed, once idle, after this long: what its server process
/// learned of every table it touched (catalog caches, plans) does not pile up forever.
/// One session per connection per half hour.
pub const POOL_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Pause before a panicked source task starts again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Source names in use across the relay's databases: a discovered source whose name
/// another source has is not started.
pub type Names = Arc<Mutex<HashSet<String>>>;

/// One database: its pool, its coordination, its sources.
pub struct Database {
    /// `host:port/dbname`, its label in metrics, logs and `/health/deep`.
    pub label: String,
    /// Its pool for claims, settles and stats, shared by its sources.
    pub pool: Pool,
    /// Its coordination connection.
    pub coordinator: Arc<Coordinator>,
    relay: Arc<Settings>,
    sink: Arc<Sink>,
    metrics: Arc<Metrics>,
    /// Its `schema_pattern` sources.
    patterns: Vec<PatternSettings>,
    names: Names,
    /// Its running sources, configured ones first, in the order they started.
    sources: Mutex<Vec<Running>>,
    /// Cancelled when the relay stops.
    cancel: CancellationToken,
}

/// A source and the token that stops it alone.
struct Running {
    source: Arc<Source>,
    /// A child of the relay's token.
    stop: CancellationToken,
    /// Found by a pattern (stopped when its schema goes away).
    discovered: bool,
    /// Stopped because its schema went away.
    gone: bool,
}

impl Database {
    /// The database of `fixed` sources and `patterns`, which share one database URL's
    /// identity, until `cancel`. Connects nothing yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        label: String,
        fixed: Vec<SourceSettings>,
        patterns: Vec<PatternSettings>,
        relay: Arc<Settings>,
        sink: Arc<Sink>,
        metrics: Arc<Metrics>,
        names: Names,
        cancel: CancellationToken,
    ) -> Result<Arc<Database>> {
        let (url, coordination): (&DatabaseUrl, Option<&DatabaseUrl>) =
            match (fixed.first(), patterns.first()) {
                (Some(s), _) => (&s.database_url, s.coordination_url.as_ref()),
                (None, Some(p)) => (&p.database_url, p.coordination_url.as_ref()),
                (None, None) => anyhow::bail!("database {label} has no source"),
            };
        let pool = url
            .pool(relay.pool_size, relay.operation_timeout)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("database {label}"))?;
        // Replicas configured with the same sources here share them.
        let configured: Vec<String> = fixed
            .iter()
            .map(|s| format!("schema:{}", s.schema))
            .chain(
                patterns
                    .iter()
                    .map(|p| format!("pattern:{}", p.schema_pattern)),
            )
            .collect();
        let coordinator = Arc::new(Coordinator::new(
            coordination.unwrap_or(url).clone(),
            label.clone(),
            group_of(&configured),
            relay.operation_timeout,
            metrics.clone(),
        ));
        let db = Arc::new(Database {
            label,
            pool,
            coordinator,
            relay,
            sink,
            metrics,
            patterns,
            names,
            sources: Mutex::default(),
            cancel,
        });
        for s in fixed {
            db.add(s, false);
        }
        Ok(db)
    }

    /// Its sources now.
    pub fn sources(&self) -> Vec<Arc<Source>> {
        lock(&self.sources)
            .iter()
            .map(|r| r.source.clone())
            .collect()
    }

    /// A source and its registration with the coordinator and the metrics.
    fn add(&self, settings: SourceSettings, discovered: bool) -> (Arc<Source>, CancellationToken) {
        let source = Arc::new(Source::new(
            settings,
            self.pool.clone(),
            self.coordinator.clone(),
            self.relay.clone(),
            self.sink.clone(),
            self.metrics.clone(),
        ));
        let name = source.name();
        self.metrics.add_source(name);
        self.metrics
            .dead_letter_capacity
            .with_label_values(&[name])
            .set(self.relay.dead_letter_size);
        self.coordinator
            .register(&source.settings.schema, name.into(), source.health.clone());
        let stop = self.cancel.child_token();
        lock(&self.sources).push(Running {
            source: source.clone(),
            stop: stop.clone(),
            discovered,
            gone: false,
        });
        (source, stop)
    }

    /// Runs the database until the relay stops: its sources' tasks, its coordinator,
    /// the look for pending rows, the stats refresh and the discovery of pattern
    /// sources. Returns once every source task has ended.
    pub async fn run(self: Arc<Self>) {
        let cancel = self.cancel.clone();
        let mut tasks: JoinSet<String> = JoinSet::new();
        for r in lock(&self.sources).iter() {
            tasks.spawn(supervise(r.source.clone(), r.stop.clone()));
        }
        let coordinator = self
            .relay
            .enabled
            .then(|| tokio::spawn(self.clone().coordinate(cancel.clone())));
        // The figures in their own task: a slow refresh never holds up the look for
        // pending rows, which wakes sources.
        let stats_task = {
            let db = self.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut look = stats::StatsLook::default();
                let mut tick = tokio::time::interval(db.relay.health.refresh_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = cancel.cancelled() => return,
                    }
                    db.pool
                        .retain(|_, m| m.last_used() < POOL_IDLE && m.age() < POOL_LIFETIME);
                    db.refresh_stats(&mut look).await;
                }
            })
        };
        let mut look = Looks::default();
        let every = |d: Duration| {
            let mut t = tokio::time::interval(d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut discovery = every(self.relay.discovery_interval);
        let mut probe = every(self.relay.process_interval);
        let discovering = !self.patterns.is_empty();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Ok(name) = done {
                        self.stopped(&name);
                    }
                }
                _ = discovery.tick(), if discovering => {
                    self.discover(&mut look, &mut tasks).await;
                }
                _ = probe.tick(), if self.relay.enabled => self.probe(&mut look).await,
            }
        }
        while tasks.join_next().await.is_some() {}
        stats_task.abort();
        if let Some(c) = coordinator {
            let _ = c.await;
        }
    }

    /// Runs the coordinator until `cancel`, starting it again after a panic: without
    /// it no source of the database is led.
    async fn coordinate(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let run = self
                .coordinator
                .clone()
                .run(self.relay.retry.backoff_base, cancel.clone());
            match AssertUnwindSafe(run).catch_unwind().await {
                Ok(()) => return,
                Err(panic) => {
                    error!(database = %self.label, panic = %panic_text(&panic), "coordinator panicked; restarting it");
                    tokio::select! {
                        _ = tokio::time::sleep(RESTART_DELAY) => {}
                        _ = cancel.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Wakes every source this replica leads that has a row to claim: the fallback for
    /// a missed notification, and the wake-up of rows whose retry is due. One statement
    /// per [`PER_STATEMENT`] sources led.
    async fn probe(&self, look: &mut Looks) {
        let led: Vec<Arc<Source>> = self
            .sources()
            .into_iter()
            .filter(|s| s.health.is_leader())
            .collect();
        let timeout = self.relay.operation_timeout;
        let mut used = Vec::new();
        for chunk in led.chunks(PER_STATEMENT) {
            let owned: Vec<Arc<Store>> = chunk.iter().map(|s| s.store()).collect();
            let stores: Vec<&Store> = owned.iter().map(|s| s.as_ref()).collect();
            let sql = Store::ready_of_all(&stores);
            let rows = self.query(&sql, "look for pending rows", timeout).await;
            used.push(sql);
            match rows {
                Ok(rows) => {
                    look.probe_outage.recovered(&self.label);
                    for r in rows {
                        if let Some(s) = r
                            .try_get::<_, i32>(0)
                            .ok()
                            .and_then(|i| chunk.get(i as usize))
                        {
                            self.coordinator.wake(&s.settings.schema);
                        }
                    }
                }
                Err(e) => {
                    // A source that leads learns of the outage from its own claims; this
                    // only says why the look failed, once per outage.
                    let _ = look.probe_outage.failed(
                        &self.label,
                        Problem::of(&e).looking(),
                        &e.to_string(),
                        Duration::ZERO,
                    );
                    break;
                }
            }
        }
        look.probe.keep(&self.pool, used);
    }

    /// One statement on a pooled connection, prepared once per connection.
    async fn query(
        &self,
        sql: &str,
        what: &'static str,
        timeout: Duration,
    ) -> Result<Vec<tokio_postgres::Row>, DbError> {
        tokio::time::timeout(timeout, async {
            let c = self
                .pool
                .get()
                .await
                .map_err(|e| DbError::pool(what, &e, timeout))?;
            let stmt = c
                .prepare_cached(sql)
                .await
                .map_err(|e| DbError::pg(what, &e))?;
            c.query(&stmt, &[]).await.map_err(|e| DbError::pg(what, &e))
        })
        .await
        .map_err(|_| DbError::timed_out(what, timeout))?
    }

    /// Lists the schemas matching the patterns; starts the sources of new ones and stops
    /// those of schemas gone.
    async fn discover(&self, look: &mut Looks, tasks: &mut JoinSet<String>) {
        let timeout = self.relay.operation_timeout;
        let found = async {
            let c = self
                .pool
                .get()
                .await
                .map_err(|e| DbError::pool("list schemas", &e, timeout))?;
            matching_schemas(&**c, &self.patterns, true, timeout).await
        }
        .await;
        let found = match found {
            Ok(f) => {
                look.discovery_outage.recovered(&self.label);
                f
            }
            Err(e) => {
                let _ = look.discovery_outage.failed(
                    &self.label,
                    Problem::of(&e).discovering(),
                    &e.to_string(),
                    Duration::ZERO,
                );
                return;
            }
        };
        for schema in found.odd {
            if look.odd.insert(schema.clone()) {
                warn!(database = %self.label, schema, "schema matches a schema_pattern but its name is not a plain lowercase identifier: not relayed");
            }
        }
        let (present, fixed): (HashMap<String, bool>, HashSet<String>) = {
            let running = lock(&self.sources);
            (
                running
                    .iter()
                    .map(|r| (r.source.settings.schema.clone(), r.gone))
                    .collect(),
                running
                    .iter()
                    .filter(|r| !r.discovered)
                    .map(|r| r.source.settings.schema.clone())
                    .collect(),
            )
        };
        let mut wanted: BTreeMap<String, SourceSettings> = BTreeMap::new();
        for (i, schema) in found.matches {
            if !fixed.contains(&schema) {
                wanted.insert(schema.clone(), self.patterns[i].source_for(&schema));
            }
        }
        // Schemas gone (dropped, or their outbox table): their sources stop.
        for r in lock(&self.sources).iter_mut() {
            if r.discovered && !r.gone && !wanted.contains_key(&r.source.settings.schema) {
                info!(source = r.source.name(), schema = %r.source.settings.schema, "schema no longer matches or holds no outbox table: stopping its source");
                r.gone = true;
                r.stop.cancel();
            }
        }
        for (schema, settings) in wanted {
            if present.contains_key(&schema) {
                continue;
            }
            if !lock(&self.names).insert(settings.name.clone()) {
                if look.clashes.insert(settings.name.clone()) {
                    warn!(database = %self.label, schema, source = %settings.name, "a schema_pattern source would take a name another source has: not relayed");
                }
                continue;
            }
            info!(source = %settings.name, schema, topic = %settings.topic, "found a source by schema_pattern");
            let (source, stop) = self.add(settings, true);
            tasks.spawn(supervise(source, stop));
        }
    }

    /// A source's task ended: if it was stopped alone, it is gone.
    fn stopped(&self, name: &str) {
        let mut running = lock(&self.sources);
        let Some(i) = running
            .iter()
            .position(|r| r.source.name() == name && r.gone)
        else {
            return;
        };
        let r = running.remove(i);
        drop(running);
        self.coordinator.forget(&r.source.settings.schema);
        self.metrics.remove_source(name);
        lock(&self.names).remove(name);
    }
}

/// What the database's periodic looks keep between rounds.
#[derive(Default)]
struct Looks {
    probe: Cached,
    probe_outage: OutageOf,
    discovery_outage: OutageOf,
    /// Matching schemas with odd names, and names taken, already warned about.
    odd: HashSet<String>,
    clashes: HashSet<String>,
}

/// An outage of the database's own (logged with `database`).
struct OutageOf(Outage);

impl Default for OutageOf {
    fn default() -> Self {
        OutageOf(Outage::database())
    }
}

impl std::ops::Deref for OutageOf {
    type Target = Outage;
    fn deref(&self) -> &Outage {
        &self.0
    }
}

impl std::ops::DerefMut for OutageOf {
    fn deref_mut(&mut self) -> &mut Outage {
        &mut self.0
    }
}

/// The statements of a periodic look, prepared on the pool's connections: those the
/// last round used stay, the others (their sources changed) leave the statement caches.
#[derive(Default)]
struct Cached {
    used: HashSet<String>,
}

impl Cached {
    fn keep(&mut self, pool: &Pool, used: Vec<String>) {
        let used: HashSet<String> = used.into_iter().collect();
        for old in self.used.difference(&used) {
            pool.manager().statement_caches.remove(old, &[]);
        }
        self.used = used;
    }
}

/// Runs a source, catching a panic and starting it again after a pause, until `stop`
/// (the relay stops, or the source alone); returns its name.
async fn supervise(source: Arc<Source>, stop: CancellationToken) -> String {
    loop {
        let r = AssertUnwindSafe(source.run(stop.clone()))
            .catch_unwind()
            .await;
        match r {
            Ok(()) => return source.name().to_string(),
            Err(panic) => {
                let msg = panic_text(&panic);
                error!(source = %source.settings.name, panic = %msg, "source task panicked; restarting it");
                source.reset_after_panic(&msg);
                tokio::select! {
                    _ = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = stop.cancelled() => return source.name().to_string(),
                }
            }
        }
    }
}

/// What a panic said.
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
