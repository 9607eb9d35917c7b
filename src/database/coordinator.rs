//! Who leads which source: one coordination connection per database and replica.
//!
//! A replica leads a source while it holds the source's session advisory lock. Every
//! lock a replica holds in a database is on that database's one coordination
//! connection, which also LISTENs once and hands each wake-up to the source it names.
//! The [`Coordinator`] runs one loop per database: once a second (and whenever a source
//! of this replica starts waiting) it counts the replicas and sees which locks anyone
//! holds, in one look at `pg_locks`; hands over what this replica leads beyond its
//! share; and takes free sources up to its share in one statement. Source tasks only
//! wait for a [`Leadership`] ([`Coordinator::lead`]): following costs no statement, no
//! session and no timer per source.
//!
//! Replicas share the sources. Each holds a membership lock (its own key of a second
//! advisory-lock class) on its coordination connection, so PostgreSQL itself knows who
//! is alive; with R members a replica takes at most ceil(N / R) of a database's N
//! sources, and one that leads more than that (a replica joined) asks the excess to
//! hand over: they stop claiming, let what is out land and settle, then unlock, and
//! the other replicas take them at their next look.
//!
//! The locks live exactly as long as the connection: a relay that dies or is cut off
//! releases them as soon as PostgreSQL notices (the connection asks the server for TCP
//! keepalives and a user timeout: 20-25 s). A connection that does not answer the count
//! within min(`operation_timeout`, [`FENCE_WITHIN`]) of the last answer is given up, and
//! every source led over it stops claiming, sending and settling, before the server can
//! have freed their locks for another replica.
//!
//! A pooler in transaction mode between the relay and PostgreSQL would hand the
//! connection's statements to any server process: the locks would be held by a process
//! the relay no longer talks to. A new connection is refused when a second connection
//! to the same URL is served by the same server process, and a live one is given up
//! when its membership lock is not held by the process answering the count.
//!
//! About 900 lines, in one file on purpose: the session, the leaderships it hands out
//! and the coordinator's looks share one set of locks (entries, held, releasing,
//! subscribers), and every rule about who may take, keep or hand over a source reads
//! them; split apart, the lock order would have to be followed across files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::db::{DatabaseUrl, DbError, Notice};
use crate::health::SourceHealth;
use crate::metrics::Metrics;
use crate::migrate::{LOCK_CLASS, WAIT_CLASS};
use crate::source::outage::{Outage, Problem};

/// How often the members are counted, which also proves the connection still answers.
pub const MEMBERSHIP_POLL: Duration = Duration::from_secs(1);
/// The longest a replica keeps leading over a connection that stopped answering (or
/// `operation_timeout`, if shorter). PostgreSQL gives up on a silent relay session
/// after 20-25 s (the TCP user timeout and keepalives the connection asks of it) and
/// frees its locks for another replica: the sources led over it must have stopped by
/// then, whatever `operation_timeout` says.
pub const FENCE_WITHIN: Duration = Duration::from_secs(15);
/// The advisory-lock class of the replicas' membership locks. The key is the replica
/// group (24 bits, [`group_of`]) and a slot (8 bits): replicas configured with the same
/// sources for a database count each other, and another relay deployment on the same
/// database does not shrink their share.
const MEMBER_CLASS: i32 = LOCK_CLASS + 1;
/// Replicas of a group at most.
const SLOTS: i64 = 256;
/// One look at pg_locks: the live members of this replica's group ($4), the keys of
/// the source locks held by anyone, whether this connection's own membership lock ($3)
/// is held by the server process answering, and how many sources the least loaded
/// other member of the group leads (-1: none).
const COUNT_MEMBERS: &str = "WITH l AS (SELECT pid, classid::int8 AS c, objid::int8 AS o \
         FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())), \
     m AS (SELECT pid FROM l WHERE c = $1 AND o / 256 = $4) \
     SELECT (SELECT count(*) FROM m), \
         COALESCE((SELECT array_agg(o) FROM l WHERE c = $2), '{}'), \
         (SELECT count(*) FROM l WHERE c = $1 AND o = $3 AND pid = pg_backend_pid()), \
         COALESCE((SELECT min((SELECT count(*) FROM l s WHERE s.pid = m.pid AND s.c = $2)) \
             FROM m WHERE m.pid <> pg_backend_pid()), -1)";
/// Looks a waiting source must stay free, and for how long at least, before a replica
/// at its share takes it anyway: no source is left unled because every replica is at
/// its share (one gave it up for want of a connection, or the others do not know it).
/// Looks alone were not enough: at start every registered source kicks a look, and a
/// replica took the sources of one still starting its 1,000 tasks within a second.
const STARVED_LOOKS: u32 = 3;
const STARVED_AFTER: Duration = Duration::from_secs(5);
/// How long a source taken beyond the share is kept from handovers. Only for a while:
/// a replica that was merely slow to start its sources (1,000 of them) left them free
/// for a few looks, and kept for good they left it with 8 of 1,001 sources for the
/// rest of the run. A replica that cannot take them for want of connections gives them
/// up again, and they come back here after this long, not in a tight loop.
const STARVED_HOLD: Duration = Duration::from_secs(20);
/// The key of each schema's source lock, as every version of the relay computes it,
/// and of its waiting lock, as migration 005's trigger computes it.
const LOCK_KEYS: &str =
    "SELECT k, hashtext('relay:' || k), hashtext(k) FROM unnest($1::text[]) AS k";
/// Takes what it can of the source locks `$2`; returns the keys it got.
const LOCK_MANY: &str = "SELECT k FROM unnest($2::int4[]) AS k WHERE pg_try_advisory_lock($1, k)";
const UNLOCK: &str = "SELECT pg_advisory_unlock($1, $2)";
const TRY_LOCK: &str = "SELECT pg_try_advisory_lock($1, $2)";

/// The coordination of one database's sources by this replica.
pub struct Coordinator {
    url: DatabaseUrl,
    /// The database, as metrics and logs name it.
    database: String,
    /// This replica's group: [`group_of`] its sources' configuration.
    group: i64,
    timeout: Duration,
    metrics: Arc<Metrics>,
    /// The database's sources, by schema.
    entries: Mutex<BTreeMap<String, Entry>>,
    /// A source started waiting, or one was added or removed: look again now.
    kick: Notify,
    session: Mutex<Option<Arc<Session>>>,
    /// Why the coordination connection is down, while it is.
    error: Mutex<Option<String>>,
}

/// One source as the coordinator knows it.
struct Entry {
    name: Arc<str>,
    health: Arc<SourceHealth>,
    /// Its lock's key and its waiting lock's, once the server said them.
    key: Option<i32>,
    wait_key: Option<i32>,
    /// Its task, waiting to lead.
    waiting: Option<oneshot::Sender<Leadership>>,
    /// Looks in a row that found it waiting and free, since when.
    free_looks: u32,
    free_since: Option<Instant>,
}

/// What `/health/deep` shows of a database's coordination.
#[derive(Debug, Clone, Serialize)]
pub struct CoordinationStatus {
    /// Whether the coordination connection is up.
    pub up: bool,
    /// Replicas alive at the last count.
    pub replicas: Option<usize>,
    /// Sources of this database.
    pub sources: usize,
    /// Sources this replica leads.
    pub led: usize,
    /// Why the connection is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The statements a coordination connection runs over and over, prepared once (an
/// unprepared statement costs a second round trip, and the server a second transaction).
struct Statements {
    lock_many: tokio_postgres::Statement,
    unlock: tokio_postgres::Statement,
    try_lock: tokio_postgres::Statement,
    count: tokio_postgres::Statement,
}

/// One coordination connection.
struct Session {
    client: tokio_postgres::Client,
    statements: Statements,
    /// Its membership lock's key, as `pg_locks.objid`.
    member_objid: i64,
    /// Its group.
    group: i64,
    /// Sources the least loaded other member of the group led at the last count (-1:
    /// no other member).
    least_other: std::sync::atomic::AtomicI64,
    /// Sources taken beyond the share because they starved, and when: not handed over
    /// for [`STARVED_HOLD`].
    starved: Mutex<HashMap<String, Instant>>,
    /// Wake-ups and the connection's end, for each schema this replica leads.
    subscribers: Mutex<HashMap<String, UnboundedSender<Notice>>>,
    /// The schemas whose lock this session holds, and their keys (advisory locks nest
    /// in a session: a second `pg_try_advisory_lock` would need a second unlock).
    held: Mutex<HashMap<String, i32>>,
    /// Leads being handed over, not to be asked twice.
    releasing: Mutex<HashSet<String>>,
    /// The sources waiting for rows, and their waiting locks' keys.
    waiting: Mutex<HashMap<String, i32>>,
    /// Replicas alive at the last count (at least this one).
    members: AtomicUsize,
    /// The source-lock keys (`pg_locks.objid`) somebody held at the last count.
    taken: Mutex<HashSet<i64>>,
    /// Cancelled when the connection ended or stopped answering.
    closed: CancellationToken,
}

/// The lock of one source, held. Dropping it unlocks the source (or, if the connection
/// is gone, there is nothing left to unlock).
pub struct Leadership {
    /// Weak: a connection given up closes at once, not when its last lead ends.
    session: std::sync::Weak<Session>,
    schema: String,
    key: i32,
    /// The source's wake-ups; says `Closed` when the connection is lost.
    pub notices: UnboundedReceiver<Notice>,
}

impl Coordinator {
    /// The coordinator of the database behind `url` (its coordination URL), named
    /// `database` in metrics and logs, for the replicas of `group`; connects once a
    /// source is registered.
    pub fn new(
        url: DatabaseUrl,
        database: String,
        group: u32,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Coordinator {
        Coordinator {
            url,
            database,
            group: (group & 0xff_ffff) as i64,
            timeout,
            metrics,
            entries: Mutex::default(),
            kick: Notify::new(),
            session: Mutex::default(),
            error: Mutex::default(),
        }
    }

    /// Adds a source of this database.
    pub fn register(&self, schema: &str, name: Arc<str>, health: Arc<SourceHealth>) {
        lock(&self.entries).insert(
            schema.to_string(),
            Entry {
                name,
                health,
                key: None,
                wait_key: None,
                waiting: None,
                free_looks: 0,
                free_since: None,
            },
        );
        self.kick.notify_one();
    }

    /// Removes a source (its schema is gone); its task has ended.
    pub fn forget(&self, schema: &str) {
        lock(&self.entries).remove(schema);
        self.kick.notify_one();
    }

    /// Waits until this replica leads the source of `schema`.
    pub async fn lead(&self, schema: &str) -> Leadership {
        let (tx, rx) = oneshot::channel();
        let registered = match lock(&self.entries).get_mut(schema) {
            Some(e) => {
                e.waiting = Some(tx);
                true
            }
            None => false,
        };
        if !registered {
            return std::future::pending().await;
        }
        self.kick.notify_one();
        match rx.await {
            Ok(l) => l,
            Err(_) => std::future::pending().await,
        }
    }

    /// Wakes the source of `schema` if this replica leads it (its outbox has rows).
    pub fn wake(&self, schema: &str) {
        if let Some(s) = self.live() {
            if let Some(tx) = lock(&s.subscribers).get(schema) {
                let _ = tx.send(Notice::Notify(schema.to_string()));
            }
        }
    }

    /// The source of `schema` has nothing to do and would sleep: takes its waiting lock,
    /// from which on every insert into its outbox notifies (migration 005). True once
    /// held; false while an insert that did not notify is still in flight (it holds
    /// the lock shared until it commits): claim again first.
    pub async fn wait_for_rows(&self, schema: &str) -> Result<bool, DbError> {
        let session = self
            .live()
            .ok_or_else(|| DbError::other("wait for rows", "coordination connection down"))?;
        if lock(&session.waiting).contains_key(schema) {
            return Ok(true);
        }
        if !lock(&session.held).contains_key(schema) {
            // The lead was on a connection since given up: it is ending.
            return Err(DbError::other(
                "wait for rows",
                "not led on this connection",
            ));
        }
        let key = lock(&self.entries)
            .get(schema)
            .and_then(|e| e.wait_key)
            .ok_or_else(|| DbError::other("wait for rows", "no key yet"))?;
        let got: bool = bounded(
            "waiting lock",
            self.timeout,
            session
                .client
                .query_one(&session.statements.try_lock, &[&WAIT_CLASS, &key]),
        )
        .await?
        .try_get(0)
        .map_err(|e| DbError::pg("waiting lock", &e))?;
        if got {
            lock(&session.waiting).insert(schema.to_string(), key);
        }
        Ok(got)
    }

    /// The source of `schema` works again: its waiting lock goes, and inserts stop
    /// notifying. Queued on the connection behind what was asked before it.
    pub fn stop_waiting(&self, schema: &str) {
        if let Some(s) = self.live() {
            s.stop_waiting(schema);
        }
    }

    /// Whether some replica led the source of `schema` at the last look; `None` when
    /// this replica cannot tell (no coordination connection, or the key is not known).
    pub fn led_by_anyone(&self, schema: &str) -> Option<bool> {
        let session = self.live()?;
        let key = lock(&self.entries).get(schema)?.key?;
        let taken = lock(&session.taken).contains(&objid(key));
        Some(taken || lock(&session.held).contains_key(schema))
    }

    /// Replicas alive at the last count, if the coordination connection is up.
    pub fn members(&self) -> Option<usize> {
        self.live().map(|s| s.members())
    }

    /// The coordination as `/health/deep` shows it.
    pub fn status(&self) -> CoordinationStatus {
        let live = self.live();
        CoordinationStatus {
            up: live.is_some(),
            replicas: live.as_ref().map(|s| s.members()),
            sources: lock(&self.entries).len(),
            led: live.as_ref().map_or(0, |s| lock(&s.held).len()),
            error: lock(&self.error).clone(),
        }
    }

    fn live(&self) -> Option<Arc<Session>> {
        lock(&self.session)
            .as_ref()
            .filter(|s| !s.closed.is_cancelled())
            .cloned()
    }

    /// Coordinates until `cancel`: keeps the connection, counts the replicas, hands
    /// over the excess, takes free sources up to this replica's share. While the
    /// connection cannot be had, says why in every waiting source's health and pauses
    /// as an outage does (from `backoff_base`).
    pub async fn run(self: Arc<Self>, backoff_base: Duration, cancel: CancellationToken) {
        let mut outage = Outage::database();
        // The count answers within the rest of the fence, so a connection that stops
        // answering is given up within min(operation_timeout, FENCE_WITHIN) of its last
        // answer.
        let deadline = self
            .timeout
            .min(FENCE_WITHIN)
            .saturating_sub(MEMBERSHIP_POLL)
            .max(MEMBERSHIP_POLL);
        loop {
            if lock(&self.entries).is_empty() {
                tokio::select! {
                    _ = self.kick.notified() => continue,
                    _ = cancel.cancelled() => return,
                }
            }
            let round = tokio::select! {
                r = self.round(deadline) => r,
                _ = cancel.cancelled() => return,
            };
            let (pause, closed) = match round {
                Ok(session) => {
                    outage.recovered(&self.database);
                    *lock(&self.error) = None;
                    self.show(Some(&session));
                    (None, session.closed.clone())
                }
                Err(e) => {
                    let text = e.to_string();
                    if let Some(s) = lock(&self.session).take() {
                        s.lost(&text);
                    }
                    self.failed(&text);
                    self.show(None);
                    let pause = outage.failed(&self.database, Problem::of(&e), &text, backoff_base);
                    (Some(pause), CancellationToken::new())
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause.unwrap_or(MEMBERSHIP_POLL)) => {}
                _ = self.kick.notified(), if pause.is_none() => {}
                _ = closed.cancelled() => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// One look: the connection (opened if there is none), the count, the handovers,
    /// the takeovers.
    async fn round(&self, deadline: Duration) -> Result<Arc<Session>, DbError> {
        let session = match self.live() {
            Some(s) => s,
            None => {
                let s = Session::open(&self.url, self.timeout, self.group).await?;
                *lock(&self.session) = Some(s.clone());
                s
            }
        };
        self.learn_keys(&session, deadline).await?;
        session.count_members(deadline).await?;
        session.rebalance(lock(&self.entries).len());
        // A replica that just joined takes what is free at once: waiting for replicas
        // started at the same moment cost every start a second of latency (measured in
        // the drain bench); when they do join, it hands the excess over.
        self.take_free(&session, deadline).await?;
        Ok(session)
    }

    /// Asks the server for the lock keys of sources added since the last look.
    async fn learn_keys(&self, session: &Session, deadline: Duration) -> Result<(), DbError> {
        let missing: Vec<String> = lock(&self.entries)
            .iter()
            .filter(|(_, e)| e.key.is_none())
            .map(|(s, _)| s.clone())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let rows = bounded(
            "lock keys",
            deadline,
            session.client.query(LOCK_KEYS, &[&missing]),
        )
        .await?;
        let mut entries = lock(&self.entries);
        for r in &rows {
            let schema: String = r.try_get(0).map_err(|e| DbError::pg("lock keys", &e))?;
            let key: i32 = r.try_get(1).map_err(|e| DbError::pg("lock keys", &e))?;
            let wait_key: i32 = r.try_get(2).map_err(|e| DbError::pg("lock keys", &e))?;
            if let Some(e) = entries.get_mut(&schema) {
                e.key = Some(key);
                e.wait_key = Some(wait_key);
            }
        }
        Ok(())
    }

    /// Takes free sources whose tasks wait, up to this replica's share (and beyond it
    /// those left free for [`STARVED_LOOKS`]), in one statement, and hands each its
    /// [`Leadership`].
    async fn take_free(&self, session: &Arc<Session>, deadline: Duration) -> Result<(), DbError> {
        let (candidates, starved): (Vec<(String, i32)>, HashSet<String>) = {
            let mut entries = lock(&self.entries);
            let held = lock(&session.held);
            let room = session.share(entries.len()).saturating_sub(held.len());
            let taken = lock(&session.taken);
            let mut free: Vec<(String, i32, bool)> = Vec::new();
            for (s, e) in entries.iter_mut() {
                let waits = e.waiting.as_ref().is_some_and(|w| !w.is_closed());
                let free_now = waits
                    && !held.contains_key(s)
                    && e.key.is_some_and(|k| !taken.contains(&objid(k)));
                e.free_looks = if free_now { e.free_looks + 1 } else { 0 };
                e.free_since = if free_now {
                    e.free_since.or(Some(Instant::now()))
                } else {
                    None
                };
                let long_free = e.free_looks > STARVED_LOOKS
                    && e.free_since.is_some_and(|t| t.elapsed() >= STARVED_AFTER);
                if let (true, Some(k)) = (free_now, e.key) {
                    free.push((s.clone(), k, long_free));
                }
            }
            // Replicas that look at the same moment mostly ask for different sources.
            free.shuffle(&mut rand::rng());
            let mut picked = Vec::new();
            let mut starved = HashSet::new();
            for (s, k, long_free) in free {
                if picked.len() < room {
                    picked.push((s, k));
                } else if long_free {
                    starved.insert(s.clone());
                    picked.push((s, k));
                }
            }
            (picked, starved)
        };
        if candidates.is_empty() {
            return Ok(());
        }
        let keys: Vec<i32> = candidates.iter().map(|(_, k)| *k).collect();
        let rows = bounded(
            "advisory locks",
            deadline,
            session
                .client
                .query(&session.statements.lock_many, &[&LOCK_CLASS, &keys]),
        )
        .await?;
        let got: HashSet<i32> = rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
        for (schema, key) in candidates.into_iter().filter(|(_, k)| got.contains(k)) {
            if starved.contains(&schema) {
                warn!(database = %self.database, schema, "took a source beyond this replica's share: it stayed free for {STARVED_LOOKS} looks and {STARVED_AFTER:?} (do the other replicas know it, and have connections free?)");
                lock(&session.starved).insert(schema.clone(), Instant::now());
            }
            let leadership = session.clone().leadership(schema.clone(), key);
            let waiting = lock(&self.entries)
                .get_mut(&schema)
                .and_then(|e| e.waiting.take());
            if let Some(tx) = waiting {
                // A task that stopped waiting drops the lead, which unlocks it.
                let _ = tx.send(leadership);
            }
        }
        Ok(())
    }

    /// The connection cannot be had: every source not led says why.
    fn failed(&self, text: &str) {
        *lock(&self.error) = Some(text.to_string());
        for e in lock(&self.entries).values() {
            if e.health.is_leader() {
                continue;
            }
            e.health.set_error(text);
            self.metrics.source_up.with_label_values(&[&e.name]).set(0);
            self.metrics.poll_errors.with_label_values(&[&e.name]).inc();
        }
    }

    /// The database's gauges, and the followers' `source_up` once the connection works.
    fn show(&self, session: Option<&Arc<Session>>) {
        let db = [self.database.as_str()];
        let m = &self.metrics;
        m.coordination_up
            .with_label_values(&db)
            .set(session.is_some() as i64);
        m.sources_led
            .with_label_values(&db)
            .set(session.map_or(0, |s| lock(&s.held).len()) as i64);
        if let Some(s) = session {
            m.replicas.with_label_values(&db).set(s.members() as i64);
            for e in lock(&self.entries).values() {
                if !e.health.is_leader() {
                    m.source_up.with_label_values(&[&e.name]).set(1);
                }
            }
        }
    }
}

impl Session {
    /// Connects, makes sure the connection is a session of its own, LISTENs, takes a
    /// membership slot, prepares its statements, and starts the task that hands out
    /// wake-ups.
    async fn open(
        url: &DatabaseUrl,
        timeout: Duration,
        group: i64,
    ) -> Result<Arc<Session>, DbError> {
        let (client, mut messages) = url.connect(timeout).await?;
        check_own_session(url, &client, timeout).await?;
        bounded(
            "listen",
            timeout,
            client.batch_execute("LISTEN outbox_relay"),
        )
        .await?;
        let mut slot = 0i64;
        let member_key = loop {
            if slot >= SLOTS {
                return Err(DbError::other(
                    "membership lock",
                    format!("{SLOTS} replicas of this relay already share the database"),
                ));
            }
            let key = (group * SLOTS + slot) as u32 as i32;
            let row = bounded(
                "membership lock",
                timeout,
                client.query_one(
                    "SELECT pg_try_advisory_lock($1, $2)",
                    &[&MEMBER_CLASS, &key],
                ),
            )
            .await?;
            if row
                .try_get::<_, bool>(0)
                .map_err(|e| DbError::pg("membership lock", &e))?
            {
                break key;
            }
            slot += 1;
        };
        let statements = Statements {
            lock_many: bounded("prepare", timeout, client.prepare(LOCK_MANY)).await?,
            unlock: bounded("prepare", timeout, client.prepare(UNLOCK)).await?,
            try_lock: bounded("prepare", timeout, client.prepare(TRY_LOCK)).await?,
            count: bounded("prepare", timeout, client.prepare(COUNT_MEMBERS)).await?,
        };
        let session = Arc::new(Session {
            client,
            statements,
            member_objid: objid(member_key),
            group,
            least_other: std::sync::atomic::AtomicI64::new(-1),
            starved: Mutex::default(),
            subscribers: Mutex::default(),
            held: Mutex::default(),
            releasing: Mutex::default(),
            waiting: Mutex::default(),
            members: AtomicUsize::new(1),
            taken: Mutex::default(),
            closed: CancellationToken::new(),
        });
        debug!(slot, group, "joined as a relay replica");
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
                    _ = closed.cancelled() => return,
                }
            };
            if let Some(s) = s.upgrade() {
                s.lost(&why);
            }
        });
        Ok(session)
    }

    /// Counts the live replicas and sees which source locks are held; fails when the
    /// connection does not answer in time or its membership lock is not its own.
    async fn count_members(&self, deadline: Duration) -> Result<(), DbError> {
        let pg = |e: tokio_postgres::Error| DbError::pg("count members", &e);
        let row = bounded(
            "count members",
            deadline,
            self.client.query_one(
                &self.statements.count,
                &[
                    &(MEMBER_CLASS as i64),
                    &(LOCK_CLASS as i64),
                    &self.member_objid,
                    &self.group,
                ],
            ),
        )
        .await?;
        let n: i64 = row.try_get(0).map_err(pg)?;
        let held: Vec<i64> = row.try_get(1).map_err(pg)?;
        let own: i64 = row.try_get(2).map_err(pg)?;
        let least_other: i64 = row.try_get(3).map_err(pg)?;
        if own != 1 {
            return Err(DbError::not_a_session(
                "count members",
                "the server process answering does not hold this connection's membership lock",
            ));
        }
        self.members.store((n as usize).max(1), Ordering::Relaxed);
        self.least_other.store(least_other, Ordering::Relaxed);
        *lock(&self.taken) = held.into_iter().collect();
        Ok(())
    }

    fn members(&self) -> usize {
        self.members.load(Ordering::Relaxed)
    }

    /// How many of the database's `sources` this replica may lead: ceil(N / R).
    fn share(&self, sources: usize) -> usize {
        sources.div_ceil(self.members())
    }

    /// Leading more than the share while another member of the group leads less (a
    /// replica joined): asks the excess to hand over.
    fn rebalance(&self, sources: usize) {
        let share = self.share(sources);
        let least_other = self.least_other.load(Ordering::Relaxed);
        if least_other < 0 || least_other as usize >= share {
            // Nobody of the group has room: handing over would leave sources unled.
            return;
        }
        let held = lock(&self.held);
        let mut releasing = lock(&self.releasing);
        let starved = lock(&self.starved);
        let keeping = held.len().saturating_sub(releasing.len());
        if keeping <= share {
            return;
        }
        let subscribers = lock(&self.subscribers);
        let mut candidates: Vec<&String> = held
            .keys()
            .filter(|s| {
                !releasing.contains(*s)
                    && starved
                        .get(*s)
                        .is_none_or(|at| at.elapsed() >= STARVED_HOLD)
            })
            .collect();
        candidates.sort_unstable();
        for schema in candidates.into_iter().rev().take(keeping - share) {
            if let Some(tx) = subscribers.get(schema) {
                if tx.send(Notice::HandOver).is_ok() {
                    releasing.insert(schema.clone());
                }
            }
        }
    }

    /// Releases the waiting lock of `schema`, if this session holds it.
    fn stop_waiting(self: &Arc<Self>, schema: &str) {
        let Some(key) = lock(&self.waiting).remove(schema) else {
            return;
        };
        let session = self.clone();
        tokio::spawn(async move {
            let r = session
                .client
                .execute(&session.statements.unlock, &[&WAIT_CLASS, &key])
                .await;
            if let Err(e) = r {
                // Held but forgotten, the lock would make inserts notify for nothing and
                // nest under the next one: give the connection up, and the lock with it.
                warn!(error = %e, lock = key, "waiting lock unlock failed: reconnecting");
                session.lost("waiting lock unlock failed");
            }
        });
    }

    /// The lead of a source whose lock this session just took.
    fn leadership(self: Arc<Self>, schema: String, key: i32) -> Leadership {
        lock(&self.held).insert(schema.clone(), key);
        let (tx, notices) = unbounded_channel();
        {
            // Checked and subscribed under the lock `lost` announces under: a lead made
            // while the connection is being given up hears of it either way.
            let mut subscribers = lock(&self.subscribers);
            if self.closed.is_cancelled() {
                let _ = tx.send(Notice::Closed("coordination connection closed".into()));
            }
            subscribers.insert(schema.clone(), tx);
        }
        Leadership {
            session: Arc::downgrade(&self),
            schema,
            key,
            notices,
        }
    }

    /// The connection ended or stopped answering: every source led over it ends.
    fn lost(&self, why: &str) {
        {
            let mut subscribers = lock(&self.subscribers);
            if self.closed.is_cancelled() {
                return;
            }
            self.closed.cancel();
            for (_, tx) in subscribers.drain() {
                let _ = tx.send(Notice::Closed(why.to_string()));
            }
        }
        lock(&self.held).clear();
        lock(&self.releasing).clear();
        lock(&self.waiting).clear();
        lock(&self.starved).clear();
        debug!(error = why, "coordination connection lost");
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        let Some(session) = self.session.upgrade() else {
            // The connection is gone, and the lock with it.
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            session.stop_waiting(&self.schema);
        }
        lock(&session.subscribers).remove(&self.schema);
        lock(&session.releasing).remove(&self.schema);
        lock(&session.starved).remove(&self.schema);
        if lock(&session.held).remove(&self.schema).is_none() || session.closed.is_cancelled() {
            return;
        }
        let key = self.key;
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

/// Refuses a connection that is not a session of its own: a second connection to the
/// same URL, served by the same server process, shows a pooler in transaction or
/// statement mode (PostgreSQL never gives two live connections one process).
async fn check_own_session(
    url: &DatabaseUrl,
    client: &tokio_postgres::Client,
    timeout: Duration,
) -> Result<(), DbError> {
    // The simple protocol: one message, nothing left to close afterwards that could keep
    // a pooler's server process busy while the second connection asks.
    async fn pid(c: &tokio_postgres::Client, timeout: Duration) -> Result<String, DbError> {
        let msgs = bounded(
            "session check",
            timeout,
            c.simple_query("SELECT pg_backend_pid()"),
        )
        .await?;
        msgs.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .ok_or_else(|| DbError::other("session check", "no pid"))
    }
    let mine = pid(client, timeout).await?;
    let (other, _notices) = url.connect(timeout).await?;
    let theirs = pid(&other, timeout).await?;
    if mine == theirs {
        let _ = client
            .batch_execute("SELECT pg_advisory_unlock_all()")
            .await;
        return Err(DbError::not_a_session(
            "coordination connection",
            format!("two connections to it were served by one server process, {mine}"),
        ));
    }
    Ok(())
}

/// A replica group: 24 bits of an FNV-1a hash of what configures a database's sources
/// (their schemas and schema patterns, sorted). Replicas with the same configuration
/// share its sources; a relay configured otherwise is not counted as one of them.
pub fn group_of(parts: &[String]) -> u32 {
    let mut parts: Vec<&String> = parts.iter().collect();
    parts.sort();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    (h & 0xff_ffff) as u32
}

/// `pg_locks.objid` of an advisory lock's second key.
fn objid(key: i32) -> i64 {
    key as u32 as i64
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
