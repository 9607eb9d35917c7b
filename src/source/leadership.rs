//! Leading a source: one relay process at a time holds the source's session advisory
//! lock. Every source of a database shares one coordination connection per relay
//! process ([`Coordinator`]): it holds the locks of all the sources this process leads
//! there, LISTENs once and hands each wake-up to the source it names, and is where a
//! follower asks for a lock it does not hold, so following costs no new session.
//!
//! Replicas share the sources. Each holds a membership lock (its own key of a second
//! advisory-lock class) on its coordination connection, so PostgreSQL itself knows who
//! is alive; with R members a replica takes at most ceil(N / R) of a database's N
//! sources, and one that leads more than that (a replica joined) asks the excess to
//! hand over: they stop claiming, let what is out land and settle, then unlock, and
//! the newcomer's followers take them.
//!
//! The locks live exactly as long as that connection: a relay that dies or is cut off
//! releases them as soon as PostgreSQL notices (the connection asks the server for TCP
//! keepalives). A connection that stops answering is given up within
//! `operation_timeout` (the membership count), so its sources stop claiming before another process
//! can have taken their locks over.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::db::{DatabaseUrl, DbError, Notice};
use crate::health::SourceHealth;
use crate::metrics::Metrics;
use crate::migrate::LOCK_CLASS;

/// How often a follower asks for a source's lock.
pub const TAKEOVER_POLL: Duration = Duration::from_secs(1);
/// How often the members are counted, which also proves the connection still answers.
const MEMBERSHIP_POLL: Duration = Duration::from_secs(1);
/// The advisory-lock class of the replicas' membership locks (key: a slot number).
const MEMBER_CLASS: i32 = LOCK_CLASS + 1;
/// Live members of this database (the membership locks granted), and the keys of the
/// source locks held by anyone, in one look at pg_locks.
const COUNT_MEMBERS: &str = "SELECT count(*) FILTER (WHERE classid = $1::int4::oid), \
     COALESCE(array_agg(objid::int8) FILTER (WHERE classid = $2::int4::oid), '{}') \
     FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// The key (`pg_locks.objid`) of each schema's source lock.
const LOCK_KEYS: &str = "SELECT k, hashtext('relay:' || k)::oid::int8 FROM unnest($1::text[]) AS k";

/// The coordination connection of one database, opened when a source first needs it
/// and again after it was lost.
pub struct Coordinator {
    url: DatabaseUrl,
    timeout: Duration,
    /// The schemas of this database's sources in the configuration.
    schemas: Vec<String>,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
}

/// The statements a coordination connection runs over and over, prepared once (an
/// unprepared statement costs a second round trip, and the server a second transaction).
struct Statements {
    lock: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
    count: tokio_postgres::Statement,
}

/// One coordination connection.
struct Session {
    client: tokio_postgres::Client,
    statements: Statements,
    /// Wake-ups and the connection's end, for each schema this process leads.
    subscribers: Mutex<HashMap<String, UnboundedSender<Notice>>>,
    /// The schemas whose lock this session holds (advisory locks nest in a session: a
    /// second `pg_try_advisory_lock` would need a second unlock).
    held: Mutex<HashSet<String>>,
    /// Leads being handed over, not to be asked twice.
    releasing: Mutex<HashSet<String>>,
    /// Replicas alive at the last count (at least this one).
    members: AtomicUsize,
    /// The sources of this database in the configuration.
    sources: usize,
    /// Each source's lock key (`pg_locks.objid`), to its schema.
    keys: HashMap<i64, String>,
    /// The schemas whose lock somebody held at the last count: a follower asks only for
    /// the others, so following costs no query while every source has a holder.
    taken: Mutex<HashSet<String>>,
    /// Cancelled when the connection ended or stopped answering.
    closed: CancellationToken,
}

/// The lock of one source, held. Dropping it unlocks the source (or, if the connection
/// is gone, there is nothing left to unlock).
pub struct Leadership {
    session: Arc<Session>,
    schema: String,
    /// The source's wake-ups; says `Closed` when the connection is lost.
    pub notices: UnboundedReceiver<Notice>,
}

impl Coordinator {
    /// The coordinator of the database behind `url`; connects on first use.
    /// `schemas`: those of the configuration's sources in this database.
    pub fn new(url: DatabaseUrl, timeout: Duration, schemas: Vec<String>) -> Coordinator {
        Coordinator {
            url,
            timeout,
            schemas,
            session: tokio::sync::Mutex::new(None),
        }
    }

    /// Tries the source's lock over the coordination connection. `None`: another relay
    /// holds it.
    pub async fn try_lead(&self, schema: &str) -> Result<Option<Leadership>, DbError> {
        let session = self.session().await?;
        if !session.held_now(schema) {
            if lock(&session.held).len() >= session.share() {
                // This replica leads its share; the rest is for the others.
                return Ok(None);
            }
            if lock(&session.taken).contains(schema) {
                // Held by another replica at the last count (within a second).
                return Ok(None);
            }
            let key = lock_key(schema);
            let got: bool = tokio::time::timeout(
                self.timeout,
                session
                    .client
                    .query_one(&session.statements.lock, &[&LOCK_CLASS, &key]),
            )
            .await
            .map_err(|_| DbError::timed_out("advisory lock", self.timeout))?
            .map_err(|e| DbError::pg("advisory lock", &e))?
            .try_get(0)
            .map_err(|e| DbError::pg("advisory lock", &e))?;
            if !got {
                return Ok(None);
            }
            lock(&session.held).insert(schema.to_string());
        }
        let (tx, notices) = unbounded_channel();
        if session.closed.is_cancelled() {
            let _ = tx.send(Notice::Closed("coordination connection closed".into()));
        }
        lock(&session.subscribers).insert(schema.to_string(), tx);
        Ok(Some(Leadership {
            session,
            schema: schema.to_string(),
            notices,
        }))
    }

    /// Replicas alive at the last count, if the coordination connection is up.
    pub fn members(&self) -> Option<usize> {
        let current = self.session.try_lock().ok()?;
        current
            .as_ref()
            .filter(|s| !s.closed.is_cancelled())
            .map(|s| s.members())
    }

    /// The live session, connecting if there is none.
    async fn session(&self) -> Result<Arc<Session>, DbError> {
        let mut current = self.session.lock().await;
        if let Some(s) = current.as_ref().filter(|s| !s.closed.is_cancelled()) {
            return Ok(s.clone());
        }
        *current = None;
        let s = Session::open(&self.url, self.timeout, &self.schemas).await?;
        *current = Some(s.clone());
        Ok(s)
    }
}

impl Session {
    /// Connects, LISTENs, takes a membership slot, counts the members, and starts the
    /// tasks that hand out wake-ups and keep the count.
    async fn open(
        url: &DatabaseUrl,
        timeout: Duration,
        schemas: &[String],
    ) -> Result<Arc<Session>, DbError> {
        let (client, mut messages) = url.connect(timeout).await?;
        bounded(
            "listen",
            timeout,
            client.batch_execute("LISTEN outbox_relay"),
        )
        .await?;
        let mut slot = 0i32;
        loop {
            let row = bounded(
                "membership lock",
                timeout,
                client.query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&MEMBER_CLASS, &slot],
                ),
            )
            .await?;
            if row
                .try_get::<_, bool>(0)
                .map_err(|e| DbError::pg("membership lock", &e))?
            {
                break;
            }
            slot += 1;
        }
        let rows = bounded("lock keys", timeout, client.query(LOCK_KEYS, &[&schemas])).await?;
        let mut keys = HashMap::with_capacity(rows.len());
        for r in &rows {
            let schema: String = r.try_get(0).map_err(|e| DbError::pg("lock keys", &e))?;
            let key: i64 = r.try_get(1).map_err(|e| DbError::pg("lock keys", &e))?;
            keys.insert(key, schema);
        }
        let statements = Statements {
            lock: bounded(
                "prepare",
                timeout,
                client.prepare("SELECT pg_try_advisory_lock($1, hashtext($2))"),
            )
            .await?,
            unlock: bounded(
                "prepare",
                timeout,
                client.prepare("SELECT pg_advisory_unlock($1, hashtext($2))"),
            )
            .await?,
            count: bounded("prepare", timeout, client.prepare(COUNT_MEMBERS)).await?,
        };
        let session = Arc::new(Session {
            client,
            statements,
            subscribers: Mutex::default(),
            held: Mutex::default(),
            releasing: Mutex::default(),
            members: AtomicUsize::new(1),
            sources: schemas.len(),
            keys,
            taken: Mutex::default(),
            closed: CancellationToken::new(),
        });
        session.count_members(timeout).await?;
        debug!(
            slot,
            members = session.members(),
            "joined as a relay replica"
        );
        let s = Arc::downgrade(&session);
        let closed = session.closed.clone();
        tokio::spawn(async move {
            // One delivery per notification, to the source whose schema it names.
            let why = loop {
                tokio::select! {
                    m = messages.recv() => match m {
                        Some(Notice::Notify(schema)) => {
                            let Some(s) = s.upgrade() else { return };
                            let subscriber = lock(&s.subscribers).get(&schema).cloned();
                            if let Some(tx) = subscriber {
                                let _ = tx.send(Notice::Notify(schema));
                            }
                        }
                        Some(Notice::HandOver) => {}
                        Some(Notice::Closed(why)) => break why,
                        None => break "connection closed".to_string(),
                    },
                    _ = closed.cancelled() => break "coordination connection unresponsive".to_string(),
                }
            };
            if let Some(s) = s.upgrade() {
                s.lost(&why);
            }
        });
        let s = Arc::downgrade(&session);
        tokio::spawn(async move {
            // The count answers within the rest of operation_timeout, so a connection
            // that stops answering is given up within operation_timeout of its last
            // answer: its sources stop claiming before the server can free their locks.
            let deadline = timeout.saturating_sub(MEMBERSHIP_POLL).max(MEMBERSHIP_POLL);
            let mut tick = tokio::time::interval(MEMBERSHIP_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(s) = s.upgrade() else { return };
                if s.closed.is_cancelled() {
                    return;
                }
                if let Err(e) = s.count_members(deadline).await {
                    warn!(error = %e, "coordination connection does not answer: giving up its sources");
                    s.lost("coordination connection unresponsive");
                    return;
                }
                s.rebalance();
            }
        });
        Ok(session)
    }

    /// Counts the live replicas.
    async fn count_members(&self, deadline: Duration) -> Result<(), DbError> {
        let pg = |e: tokio_postgres::Error| DbError::pg("count members", &e);
        let row = tokio::time::timeout(
            deadline,
            self.client
                .query_one(&self.statements.count, &[&MEMBER_CLASS, &LOCK_CLASS]),
        )
        .await
        .map_err(|_| DbError::timed_out("count members", deadline))?
        .map_err(pg)?;
        let n: i64 = row.try_get(0).map_err(pg)?;
        let held: Vec<i64> = row.try_get(1).map_err(pg)?;
        self.members.store((n as usize).max(1), Ordering::Relaxed);
        *lock(&self.taken) = held
            .iter()
            .filter_map(|k| self.keys.get(k).cloned())
            .collect();
        Ok(())
    }

    fn members(&self) -> usize {
        self.members.load(Ordering::Relaxed)
    }

    /// How many of the database's sources this replica may lead: ceil(N / R).
    fn share(&self) -> usize {
        self.sources.div_ceil(self.members())
    }

    /// Leading more than the share (a replica joined): asks the excess to hand over.
    fn rebalance(&self) {
        let share = self.share();
        let held = lock(&self.held);
        let mut releasing = lock(&self.releasing);
        let keeping = held.len().saturating_sub(releasing.len());
        if keeping <= share {
            return;
        }
        let subscribers = lock(&self.subscribers);
        let mut candidates: Vec<&String> =
            held.iter().filter(|s| !releasing.contains(*s)).collect();
        candidates.sort_unstable();
        for schema in candidates.into_iter().rev().take(keeping - share) {
            if let Some(tx) = subscribers.get(schema) {
                if tx.send(Notice::HandOver).is_ok() {
                    releasing.insert(schema.clone());
                }
            }
        }
    }

    fn held_now(&self, schema: &str) -> bool {
        !self.closed.is_cancelled() && lock(&self.held).contains(schema)
    }

    /// The connection ended or stopped answering: every source led over it ends.
    fn lost(&self, why: &str) {
        self.closed.cancel();
        lock(&self.held).clear();
        lock(&self.releasing).clear();
        for (_, tx) in lock(&self.subscribers).drain() {
            let _ = tx.send(Notice::Closed(why.to_string()));
        }
        debug!(error = why, "coordination connection lost");
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        lock(&self.session.subscribers).remove(&self.schema);
        lock(&self.session.releasing).remove(&self.schema);
        if !lock(&self.session.held).remove(&self.schema) || self.session.closed.is_cancelled() {
            return;
        }
        let session = self.session.clone();
        let key = lock_key(&self.schema);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // The process is ending: the connection, and the lock, go with it.
            session.lost("shutting down");
            return;
        };
        runtime.spawn(async move {
            let r = session
                .client
                .execute(&session.statements.unlock, &[&LOCK_CLASS, &key])
                .await;
            if let Err(e) = r {
                // A lock this session may still hold but no longer counts as held would
                // be taken again on top (advisory locks nest) and never let go: give the
                // connection up, and every lock with it.
                warn!(error = %e, lock = key, "advisory unlock failed: reconnecting");
                session.lost("advisory unlock failed");
            }
        });
    }
}

/// `f`, within `timeout`, its errors typed.
async fn bounded<T>(
    what: &'static str,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, DbError> {
    tokio::time::timeout(timeout, f)
        .await
        .map_err(|_| DbError::timed_out(what, timeout))?
        .map_err(|e| DbError::pg(what, &e))
}

fn lock_key(schema: &str) -> String {
    format!("relay:{schema}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shows whether this replica leads the source, in its health and its metric.
pub fn show_leader(health: &SourceHealth, metrics: &Metrics, name: &str, on: bool) {
    health.leader.store(on, Ordering::Relaxed);
    metrics
        .source_leader
        .with_label_values(&[name])
        .set(on as i64);
}
