//! Leading a source: one relay process at a time holds the source's session advisory
//! lock. Every source of a database shares one coordination connection per relay
//! process ([`Coordinator`]): it holds the locks of all the sources this process leads
//! there, LISTENs once and hands each wake-up to the source it names, and is where a
//! follower asks for a lock it does not hold, so following costs no new session.
//!
//! The locks live exactly as long as that connection: a relay that dies or is cut off
//! releases them as soon as PostgreSQL notices (the connection asks the server for TCP
//! keepalives). A connection that stops answering is given up within
//! `operation_timeout` (a ping), so its sources stop claiming before another process
//! can have taken their locks over.

use std::collections::{HashMap, HashSet};
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
/// How often an idle coordination connection is asked whether it still answers.
const PING_EVERY: Duration = Duration::from_secs(5);

/// The coordination connection of one database, opened when a source first needs it
/// and again after it was lost.
pub struct Coordinator {
    url: DatabaseUrl,
    timeout: Duration,
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
}

/// One coordination connection.
struct Session {
    client: tokio_postgres::Client,
    /// Wake-ups and the connection's end, for each schema this process leads.
    subscribers: Mutex<HashMap<String, UnboundedSender<Notice>>>,
    /// The schemas whose lock this session holds (advisory locks nest in a session: a
    /// second `pg_try_advisory_lock` would need a second unlock).
    held: Mutex<HashSet<String>>,
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
    pub fn new(url: DatabaseUrl, timeout: Duration) -> Coordinator {
        Coordinator {
            url,
            timeout,
            session: tokio::sync::Mutex::new(None),
        }
    }

    /// Tries the source's lock over the coordination connection. `None`: another relay
    /// holds it.
    pub async fn try_lead(&self, schema: &str) -> Result<Option<Leadership>, DbError> {
        let session = self.session().await?;
        if !session.held_now(schema) {
            let key = lock_key(schema);
            let got: bool = tokio::time::timeout(
                self.timeout,
                session.client.query_one(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))",
                    &[&LOCK_CLASS, &key],
                ),
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

    /// The live session, connecting if there is none.
    async fn session(&self) -> Result<Arc<Session>, DbError> {
        let mut current = self.session.lock().await;
        if let Some(s) = current.as_ref().filter(|s| !s.closed.is_cancelled()) {
            return Ok(s.clone());
        }
        *current = None;
        let s = Session::open(&self.url, self.timeout).await?;
        *current = Some(s.clone());
        Ok(s)
    }
}

impl Session {
    /// Connects, LISTENs, and starts the tasks that hand out wake-ups and ping.
    async fn open(url: &DatabaseUrl, timeout: Duration) -> Result<Arc<Session>, DbError> {
        let (client, mut messages) = url.connect(timeout).await?;
        tokio::time::timeout(timeout, client.batch_execute("LISTEN outbox_relay"))
            .await
            .map_err(|_| DbError::timed_out("listen", timeout))?
            .map_err(|e| DbError::pg("listen", &e))?;
        let session = Arc::new(Session {
            client,
            subscribers: Mutex::default(),
            held: Mutex::default(),
            closed: CancellationToken::new(),
        });
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
            let mut tick = tokio::time::interval(PING_EVERY.min(timeout));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(s) = s.upgrade() else { return };
                if s.closed.is_cancelled() {
                    return;
                }
                let answered = tokio::time::timeout(timeout, s.client.simple_query(""))
                    .await
                    .is_ok_and(|r| r.is_ok());
                if !answered {
                    warn!(
                        timeout_s = timeout.as_secs_f64(),
                        "coordination connection does not answer: giving up its sources"
                    );
                    s.lost("coordination connection unresponsive");
                    return;
                }
            }
        });
        Ok(session)
    }

    fn held_now(&self, schema: &str) -> bool {
        !self.closed.is_cancelled() && lock(&self.held).contains(schema)
    }

    /// The connection ended or stopped answering: every source led over it ends.
    fn lost(&self, why: &str) {
        self.closed.cancel();
        lock(&self.held).clear();
        for (_, tx) in lock(&self.subscribers).drain() {
            let _ = tx.send(Notice::Closed(why.to_string()));
        }
        debug!(error = why, "coordination connection lost");
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        lock(&self.session.subscribers).remove(&self.schema);
        if !lock(&self.session.held).remove(&self.schema) || self.session.closed.is_cancelled() {
            return;
        }
        let session = self.session.clone();
        let key = lock_key(&self.schema);
        tokio::spawn(async move {
            let r = session
                .client
                .execute(
                    "SELECT pg_advisory_unlock($1, hashtext($2))",
                    &[&LOCK_CLASS, &key],
                )
                .await;
            if let Err(e) = r {
                // The connection is going: the server frees the lock with it.
                debug!(error = %e, lock = key, "advisory unlock failed");
            }
        });
    }
}

fn lock_key(schema: &str) -> String {
    format!("relay:{schema}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shows whether this replica leads the source, in its health and its metric.
pub fn show_leader(health: &SourceHealth, metrics: &Metrics, name: &str, on: bool) {
    health
        .leader
        .store(on, std::sync::atomic::Ordering::Relaxed);
    metrics
        .source_leader
        .with_label_values(&[name])
        .set(on as i64);
}
