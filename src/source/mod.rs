//! One outbox source: win the source's lock, then claim, publish, settle, repeat.
//!
//! Invariants:
//! - no row lock and no open transaction is held while waiting for Kafka;
//! - one relay process works a source at a time (a session advisory lock on a dedicated
//!   connection); whoever holds it reads the lowest pending ids, never "after the last
//!   id seen", so rows that commit late are not skipped;
//! - a row leaves the outbox only after Kafka acknowledged it, or into the dead-letter
//!   table in the same transaction that deletes it;
//! - cancellation is checked between batches, never between "publish" and "settle".

pub mod store;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use futures::future::join_all;
use rdkafka::producer::FutureRecord;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{AfterDeadLetter, Settings, SourceSettings};
use crate::db::{chain, Notice};
use crate::metrics::Metrics;
use crate::migrate::LOCK_CLASS;
use crate::retry::backoff_jittered;
use crate::sink::{breaks_producer, build_record, classify, Blame, Failure};
use store::{Event, Store};

/// How often a follower asks for a source's lock.
const TAKEOVER_POLL: Duration = Duration::from_secs(1);
/// How often an ongoing outage is logged again.
const OUTAGE_REMINDER: Duration = Duration::from_secs(60);
/// Longest pause of a source between tries while Kafka or PostgreSQL is down.
const OUTAGE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the HTTP server and the supervisor can see of a source, updated by its task.
#[derive(Debug, Default)]
pub struct SourceState {
    /// Unix milliseconds of the task's last sign of life (progress or an idle wake-up).
    pub heartbeat_ms: AtomicU64,
    /// Whether this replica holds the source.
    pub leader: AtomicBool,
    /// Events published by this process.
    pub processed: AtomicU64,
    /// Failed publish attempts seen by this process.
    pub failed: AtomicU64,
    /// Rows pending at the last refresh.
    pub pending: AtomicI64,
    /// Rows in the dead-letter table at the last refresh.
    pub dead_letter_rows: AtomicI64,
    /// The last error, for `/health/deep`.
    pub last_error: Mutex<Option<String>>,
    /// Fault injection for tests: while set, the task stops making progress.
    pub stall: AtomicBool,
    /// Fault injection for tests: when set, the task panics once at its next step.
    pub panic_once: AtomicBool,
}

impl SourceState {
    /// Records a sign of life now.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Milliseconds since the last sign of life.
    pub fn silent_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
    }

    fn set_error(&self, e: impl Into<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e.into());
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything one source's task needs.
pub struct Source {
    /// Its settings.
    pub settings: SourceSettings,
    /// The pool of its database (shared with sources of the same database).
    pub pool: Pool,
    /// Its SQL.
    pub store: Store,
    /// Its visible state.
    pub state: Arc<SourceState>,
    /// The relay-wide settings.
    pub relay: Arc<Settings>,
    /// The shared producer.
    pub sink: Arc<crate::sink::Sink>,
    /// The shared metrics.
    pub metrics: Arc<Metrics>,
}

/// Why leading a source ended.
enum Ended {
    Cancelled,
    LostLock(String),
}

/// The outcome of one published batch.
#[derive(Default)]
struct Settled {
    delivered: Vec<i64>,
    retry: Vec<(i64, i32, i32, Failure)>,
    dead: Vec<(i64, Failure)>,
    transport: Option<Failure>,
    /// Aggregates whose later events must wait (an event of theirs did not go out).
    held: HashSet<(String, String)>,
}

fn is_held(held: &HashSet<(String, String)>, e: &Event) -> bool {
    held.contains(&(e.aggregate_type.clone(), e.aggregate_id.clone()))
}

/// A batch handed to the producer.
struct InFlight {
    settled: Settled,
    pending: Vec<(usize, rdkafka::producer::DeliveryFuture)>,
    producer: crate::sink::Producer,
}

/// Logs an outage once at its start, then at most once per [`OUTAGE_REMINDER`], then its end.
struct Outage {
    what: &'static str,
    since: Option<Instant>,
    last_log: Instant,
    attempts: u32,
}

impl Outage {
    fn new(what: &'static str) -> Outage {
        Outage {
            what,
            since: None,
            last_log: Instant::now(),
            attempts: 0,
        }
    }

    /// Notes a failure; returns how long to pause.
    fn failed(&mut self, source: &str, error: &str, base: Duration) -> Duration {
        self.attempts += 1;
        match self.since {
            None => {
                self.since = Some(Instant::now());
                self.last_log = Instant::now();
                warn!(
                    source,
                    error, "{} unreachable: holding events until it is back", self.what
                );
            }
            Some(since) if self.last_log.elapsed() >= OUTAGE_REMINDER => {
                self.last_log = Instant::now();
                warn!(
                    source,
                    error,
                    down_for_s = since.elapsed().as_secs(),
                    attempts = self.attempts,
                    "{} still unreachable",
                    self.what
                );
            }
            Some(_) => debug!(source, error, "{} still unreachable", self.what),
        }
        backoff_jittered(
            self.attempts,
            base.min(OUTAGE_BACKOFF_MAX),
            OUTAGE_BACKOFF_MAX,
        )
    }

    fn recovered(&mut self, source: &str) {
        if let Some(since) = self.since.take() {
            info!(
                source,
                down_for_s = since.elapsed().as_secs_f64(),
                attempts = self.attempts,
                "{} reachable again",
                self.what
            );
        }
        self.attempts = 0;
    }

    fn active(&self) -> bool {
        self.since.is_some()
    }
}

impl Source {
    fn name(&self) -> &str {
        &self.settings.name
    }

    /// Runs the source until `cancel`: take the lock, lead, and on losing it start over.
    pub async fn run(&self, cancel: CancellationToken) {
        let mut db_outage = Outage::new("postgres");
        loop {
            self.state.beat();
            if cancel.is_cancelled() {
                return;
            }
            if !self.relay.enabled {
                // Disabled: publish nothing and take no lock, so an enabled relay on the
                // same source (a rollout, a rollback) is never blocked by this one.
                if wait(
                    &cancel,
                    self.relay.process_interval.min(Duration::from_secs(5)),
                )
                .await
                {
                    return;
                }
                continue;
            }
            let lock = tokio::select! {
                r = self.try_lock() => r,
                _ = cancel.cancelled() => return,
            };
            match lock {
                Ok(Some((client, notices))) => {
                    db_outage.recovered(self.name());
                    self.metrics
                        .source_up
                        .with_label_values(&[self.name()])
                        .set(1);
                    self.set_leader(true);
                    info!(source = self.name(), "holding the source");
                    let ended = self
                        .lead(&notices_filter(notices), &cancel, &mut db_outage)
                        .await;
                    self.set_leader(false);
                    drop(client);
                    match ended {
                        Ended::Cancelled => {
                            info!(source = self.name(), "released the source");
                            return;
                        }
                        Ended::LostLock(why) => {
                            warn!(source = self.name(), error = %why, "lost the source's lock; trying to take it again");
                            self.state.set_error(format!("lost lock: {why}"));
                        }
                    }
                }
                Ok(None) => {
                    db_outage.recovered(self.name());
                    self.metrics
                        .source_up
                        .with_label_values(&[self.name()])
                        .set(1);
                    if wait(&cancel, TAKEOVER_POLL).await {
                        return;
                    }
                }
                Err(e) => {
                    self.metrics
                        .source_up
                        .with_label_values(&[self.name()])
                        .set(0);
                    self.metrics
                        .poll_errors
                        .with_label_values(&[self.name()])
                        .inc();
                    self.state.set_error(e.clone());
                    let pause = db_outage.failed(self.name(), &e, self.relay.retry.backoff_base);
                    if wait(&cancel, pause).await {
                        return;
                    }
                }
            }
        }
    }

    fn set_leader(&self, on: bool) {
        self.state.leader.store(on, Ordering::Relaxed);
        self.metrics
            .source_leader
            .with_label_values(&[self.name()])
            .set(on as i64);
    }

    /// Opens the source's dedicated connection and tries its advisory lock; on success
    /// also LISTENs for new rows. The lock lives exactly as long as the connection.
    async fn try_lock(
        &self,
    ) -> Result<Option<(tokio_postgres::Client, UnboundedReceiver<Notice>)>, String> {
        let timeout = self.relay.operation_timeout;
        let (client, notices) = self.settings.database_url.connect(timeout).await?;
        let key = format!("relay:{}", self.settings.schema);
        let got: bool = tokio::time::timeout(
            timeout,
            client.query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&LOCK_CLASS, &key],
            ),
        )
        .await
        .map_err(|_| "advisory lock: timed out".to_string())?
        .map_err(|e| format!("advisory lock: {e}"))?
        .get(0);
        if !got {
            return Ok(None);
        }
        tokio::time::timeout(timeout, client.batch_execute("LISTEN outbox_relay"))
            .await
            .map_err(|_| "listen: timed out".to_string())?
            .map_err(|e| format!("listen: {e}"))?;
        Ok(Some((client, notices)))
    }

    /// Works the source while holding its lock.
    ///
    /// Pipelined: while batch N waits for Kafka's acknowledgements, batch N-1 is settled
    /// (deleted, retried, dead-lettered) and batch N+1 is claimed, excluding N's ids.
    /// Only one batch is ever with the producer, and N+1 is sent only after N's outcome
    /// is known, so an aggregate whose event failed in N holds its later events back.
    async fn lead(
        &self,
        wake: &WakeUp,
        cancel: &CancellationToken,
        db_outage: &mut Outage,
    ) -> Ended {
        let mut kafka_outage = Outage::new("kafka");
        let (publish_hist, batch_hist, e2e_hist) = self.metrics.source_histograms(self.name());
        let block = self.relay.retry.after_dead_letter == AfterDeadLetter::Block;
        let full = self.relay.batch_size;
        // Acknowledged but not yet settled.
        let mut unsettled: Option<(Vec<Event>, Settled)> = None;
        // Claimed while the previous batch was in flight, not yet sent.
        let mut carried: Option<Vec<Event>> = None;
        let mut immediate = true;
        loop {
            self.state.beat();
            let stopping = cancel.is_cancelled();
            let lost = wake.lost();
            if carried.is_none() || stopping || lost.is_some() {
                carried = None;
                // A fresh claim must not see rows that are delivered but not yet deleted.
                if let Some((batch, settled)) = unsettled.take() {
                    if let Err(e) = self.settle(&batch, &settled).await {
                        self.db_failed(db_outage, &e, cancel).await;
                    }
                }
                if stopping {
                    return Ended::Cancelled;
                }
                if let Some(why) = lost {
                    return Ended::LostLock(why);
                }
            }
            if !immediate {
                tokio::select! {
                    _ = wake.wait(&self.settings.schema, self.relay.process_interval) => {}
                    _ = cancel.cancelled() => return Ended::Cancelled,
                }
                self.state.beat();
                if let Some(why) = wake.lost() {
                    return Ended::LostLock(why);
                }
            }
            if self.state.panic_once.swap(false, Ordering::Relaxed) {
                panic!("injected panic in source {}", self.name());
            }
            while self.state.stall.load(Ordering::Relaxed) {
                if wait(cancel, Duration::from_millis(50)).await {
                    return Ended::Cancelled;
                }
            }
            let started = Instant::now();
            let batch = match carried.take() {
                Some(b) => b,
                None => match self.claim(block, &[]).await {
                    Ok(b) => {
                        db_outage.recovered(self.name());
                        b
                    }
                    Err(e) => {
                        self.db_failed(db_outage, &e, cancel).await;
                        immediate = true;
                        continue;
                    }
                },
            };
            if batch.is_empty() {
                immediate = false;
                continue;
            }
            self.state.beat();
            let in_flight = self.send(&batch);
            let claim_next = batch.len() >= full && !cancel.is_cancelled();
            let ids: Vec<i64> = batch.iter().map(|e| e.id).collect();
            let previous = unsettled.take();
            let overlap = async {
                if let Some((b, st)) = &previous {
                    self.settle(b, st).await?;
                }
                if claim_next {
                    self.claim(block, &ids).await.map(Some)
                } else {
                    Ok(None)
                }
            };
            let (settled, overlapped) = tokio::join!(self.acks(&batch, in_flight), overlap);
            self.state.beat();
            publish_hist.observe(started.elapsed().as_secs_f64());
            let acked_at = SystemTime::now();
            for e in batch
                .iter()
                .filter(|e| settled.delivered.binary_search(&e.id).is_ok())
            {
                if let Ok(age) = acked_at.duration_since(e.created_at) {
                    e2e_hist.observe(age.as_secs_f64());
                }
            }
            let next = match overlapped {
                Ok(next) => {
                    db_outage.recovered(self.name());
                    next
                }
                Err(e) => {
                    // Delivered rows of the previous batch stay in the outbox and go out
                    // again: duplicates, never loss.
                    self.db_failed(db_outage, &e, cancel).await;
                    None
                }
            };
            let transport = settled.transport.clone();
            carried = next
                .map(|n| {
                    n.into_iter()
                        .filter(|e| settled.held.is_empty() || !is_held(&settled.held, e))
                        .collect::<Vec<_>>()
                })
                .filter(|n| !n.is_empty() && transport.is_none());
            unsettled = Some((batch, settled));
            batch_hist.observe(started.elapsed().as_secs_f64());
            match transport {
                Some(f) => {
                    if let Some((b, st)) = unsettled.take() {
                        if let Err(e) = self.settle(&b, &st).await {
                            self.db_failed(db_outage, &e, cancel).await;
                        }
                    }
                    self.metrics
                        .kafka_outage
                        .with_label_values(&[self.name()])
                        .set(1);
                    self.state.set_error(f.message.clone());
                    let pause =
                        kafka_outage.failed(self.name(), &f.message, self.relay.retry.backoff_base);
                    if wait(cancel, pause).await {
                        return Ended::Cancelled;
                    }
                    immediate = true;
                }
                None => {
                    if kafka_outage.active() {
                        self.metrics
                            .kafka_outage
                            .with_label_values(&[self.name()])
                            .set(0);
                        kafka_outage.recovered(self.name());
                    }
                    // A full batch is followed at once by the next.
                    immediate = carried.is_some() || claim_next;
                }
            }
        }
    }

    async fn db_failed(&self, outage: &mut Outage, e: &str, cancel: &CancellationToken) {
        self.metrics
            .poll_errors
            .with_label_values(&[self.name()])
            .inc();
        self.metrics
            .source_up
            .with_label_values(&[self.name()])
            .set(0);
        self.state.set_error(e.to_string());
        let pause = outage.failed(self.name(), e, self.relay.retry.backoff_base);
        wait(cancel, pause).await;
        self.metrics
            .source_up
            .with_label_values(&[self.name()])
            .set(1);
    }

    async fn claim(&self, block: bool, in_flight: &[i64]) -> Result<Vec<Event>, String> {
        let timeout = self.relay.operation_timeout;
        let work = async {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| format!("pool: {}", chain(&e)))?;
            self.store
                .claim(
                    &client,
                    self.relay.batch_size as i64,
                    self.relay.max_retries,
                    block,
                    in_flight,
                )
                .await
                .map_err(|e| format!("claim: {}", chain(&e)))
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("claim: timed out after {timeout:?}"))?
    }

    /// Hands the batch to the producer. Rows that fail before reaching it are settled
    /// here; an aggregate whose earlier row failed keeps its later rows in the outbox.
    fn send(&self, batch: &[Event]) -> InFlight {
        let producer = self.sink.producer();
        let mut settled = Settled::default();
        let mut pending = Vec::with_capacity(batch.len());
        let hold_after_dead = self.relay.retry.after_dead_letter == AfterDeadLetter::Block;
        let mut event_id = String::with_capacity(36);
        for (i, e) in batch.iter().enumerate() {
            if !settled.held.is_empty() && is_held(&settled.held, e) {
                continue;
            }
            event_id.clear();
            use std::fmt::Write;
            let _ = write!(event_id, "{}", e.event_id);
            let sent = match build_record(e, self.name(), &self.settings.topic, &event_id) {
                Ok(record) => {
                    let mut fr = FutureRecord::to(record.topic)
                        .key(record.key)
                        .headers(record.headers);
                    if let Some(p) = record.payload {
                        fr = fr.payload(p);
                    }
                    producer.send_result(fr).map_err(|(err, _)| classify(&err))
                }
                Err(f) => Err(f),
            };
            match sent {
                Ok(fut) => pending.push((i, fut)),
                Err(f) => {
                    if f.blame == Blame::Transport {
                        // The producer cannot take more; the rest of the batch stays put.
                        self.note_failure(e, &f);
                        settled.transport = Some(f);
                        for rest in &batch[i..] {
                            settled
                                .held
                                .insert((rest.aggregate_type.clone(), rest.aggregate_id.clone()));
                        }
                        break;
                    }
                    self.record_failure(&mut settled, e, f, hold_after_dead);
                }
            }
        }
        InFlight {
            settled,
            pending,
            producer,
        }
    }

    /// Waits for every acknowledgement of a sent batch.
    async fn acks(&self, batch: &[Event], in_flight: InFlight) -> Settled {
        let InFlight {
            mut settled,
            pending,
            producer,
        } = in_flight;
        let hold_after_dead = self.relay.retry.after_dead_letter == AfterDeadLetter::Block;
        let (index, futures): (Vec<usize>, Vec<_>) = pending.into_iter().unzip();
        // librdkafka resolves every delivery within message.timeout.ms (operation_timeout);
        // the margin only guards against a lost callback.
        let deadline = self.relay.operation_timeout + Duration::from_secs(5);
        let results = match tokio::time::timeout(deadline, join_all(futures)).await {
            Ok(r) => r,
            Err(_) => {
                settled.transport = Some(Failure {
                    blame: Blame::Transport,
                    reason: "transport",
                    message: format!("no acknowledgement within {deadline:?}"),
                });
                for e in batch {
                    settled
                        .held
                        .insert((e.aggregate_type.clone(), e.aggregate_id.clone()));
                }
                return settled;
            }
        };
        let mut broken: Option<String> = None;
        for (i, r) in index.into_iter().zip(results) {
            let e = &batch[i];
            let failure = match r {
                Ok(Ok(_delivery)) => {
                    settled.delivered.push(e.id);
                    continue;
                }
                Ok(Err((err, _msg))) => {
                    if broken.is_none() && breaks_producer(&err) {
                        broken = Some(err.to_string());
                    }
                    classify(&err)
                }
                Err(_canceled) => Failure {
                    blame: Blame::Transport,
                    reason: "transport",
                    message: "the producer dropped the delivery".into(),
                },
            };
            if failure.blame == Blame::Transport {
                self.note_failure(e, &failure);
                settled
                    .held
                    .insert((e.aggregate_type.clone(), e.aggregate_id.clone()));
                settled.transport = Some(failure);
            } else {
                self.record_failure(&mut settled, e, failure, hold_after_dead);
            }
        }
        if settled.transport.is_some() {
            // A fenced or otherwise dead producer fails every batch until it is replaced.
            if let Some(why) = self.sink.renew_if_broken(&producer, broken.as_deref()) {
                if let Some(t) = settled.transport.as_mut() {
                    t.message = format!("{} (producer replaced: {why})", t.message);
                }
            }
        }
        settled.delivered.sort_unstable();
        let n = settled.delivered.len() as u64;
        self.metrics
            .published
            .with_label_values(&[self.name()])
            .inc_by(n);
        self.state.processed.fetch_add(n, Ordering::Relaxed);
        settled
    }

    /// Files a failure of the event's own (permanent or retryable) for settling.
    fn record_failure(&self, settled: &mut Settled, e: &Event, f: Failure, hold_after_dead: bool) {
        self.note_failure(e, &f);
        let aggregate = (e.aggregate_type.clone(), e.aggregate_id.clone());
        match f.blame {
            Blame::Permanent => {
                if hold_after_dead {
                    settled.held.insert(aggregate);
                }
                settled.dead.push((e.id, f));
            }
            Blame::Retry | Blame::Transport => {
                settled.held.insert(aggregate);
                settled.retry.push((e.id, e.retry_count, e.max_retries, f));
            }
        }
    }

    fn note_failure(&self, e: &Event, f: &Failure) {
        self.metrics
            .failed
            .with_label_values(&[self.name(), f.reason])
            .inc();
        self.state.failed.fetch_add(1, Ordering::Relaxed);
        if f.blame != Blame::Transport {
            warn!(
                source = self.name(),
                event_id = %e.event_id,
                aggregate_id = %e.aggregate_id,
                correlation_id = e.correlation_id.as_deref().unwrap_or(""),
                reason = f.reason,
                error = %f.message,
                "publish failed"
            );
        }
    }

    /// Deletes what was delivered, records retries, and moves what failed for good.
    async fn settle(&self, batch: &[Event], s: &Settled) -> Result<(), String> {
        let timeout = self.relay.operation_timeout;
        let work = async {
            let mut client = self
                .pool
                .get()
                .await
                .map_err(|e| format!("pool: {}", chain(&e)))?;
            if !s.delivered.is_empty() {
                self.store
                    .delete(&client, &s.delivered, self.relay.delete_batch_size)
                    .await
                    .map_err(|e| format!("delete delivered rows: {e}"))?;
            }
            let mut dead: Vec<(i64, String)> = s
                .dead
                .iter()
                .map(|(id, f)| (*id, format!("{}: {}", f.reason, f.message)))
                .collect();
            let mut retry_ids = Vec::new();
            let mut retry_errors = Vec::new();
            let mut retry_delays = Vec::new();
            for (id, count, max, f) in &s.retry {
                let attempts = count + 1;
                if attempts > *max {
                    dead.push((
                        *id,
                        format!(
                            "{}: {} (gave up after {attempts} attempts)",
                            f.reason, f.message
                        ),
                    ));
                } else {
                    retry_ids.push(*id);
                    retry_errors.push(f.message.clone());
                    retry_delays.push(backoff_jittered(
                        attempts as u32,
                        self.relay.retry.backoff_base,
                        self.relay.retry.backoff_max,
                    ));
                }
            }
            if !retry_ids.is_empty() {
                self.store
                    .record_retries(&client, &retry_ids, &retry_errors, &retry_delays)
                    .await
                    .map_err(|e| format!("record retries: {e}"))?;
            }
            if !dead.is_empty() {
                dead.sort_unstable_by_key(|(id, _)| *id);
                let (ids, errors): (Vec<i64>, Vec<String>) = dead.into_iter().unzip();
                let (moved, parked) = self
                    .store
                    .dead_letter(
                        &mut client,
                        &ids,
                        &errors,
                        self.relay.dead_letter_size,
                        self.relay.retry.backoff_max,
                    )
                    .await
                    .map_err(|e| format!("dead-letter: {e}"))?;
                self.metrics
                    .dead_lettered
                    .with_label_values(&[self.name()])
                    .inc_by(moved);
                for e in batch.iter().filter(|e| ids.binary_search(&e.id).is_ok()) {
                    error!(
                        source = self.name(),
                        event_id = %e.event_id,
                        aggregate_id = %e.aggregate_id,
                        correlation_id = e.correlation_id.as_deref().unwrap_or(""),
                        "event dead-lettered"
                    );
                }
                if parked > 0 {
                    let msg = format!(
                        "dead-letter table full ({} rows): {parked} failing events stay in the outbox",
                        self.relay.dead_letter_size
                    );
                    error!(
                        source = self.name(),
                        parked,
                        capacity = self.relay.dead_letter_size,
                        "dead-letter table full: failing events stay in the outbox"
                    );
                    self.state.set_error(msg);
                }
            }
            Ok::<(), String>(())
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| format!("settle batch: timed out after {timeout:?}"))?
    }
}

/// The wake-up side of a source's dedicated connection: NOTIFYs and its death.
struct WakeUp {
    rx: tokio::sync::Mutex<UnboundedReceiver<Notice>>,
    lost: Mutex<Option<String>>,
    /// A notification taken off the channel by `lost()`, still to be acted on.
    woken: AtomicBool,
}

fn notices_filter(rx: UnboundedReceiver<Notice>) -> WakeUp {
    WakeUp {
        rx: tokio::sync::Mutex::new(rx),
        lost: Mutex::new(None),
        woken: AtomicBool::new(false),
    }
}

impl WakeUp {
    /// Why the connection (and so the lock) was lost, if it was.
    fn lost(&self) -> Option<String> {
        if let Ok(mut rx) = self.rx.try_lock() {
            loop {
                match rx.try_recv() {
                    Ok(Notice::Closed(why)) => {
                        self.set_lost(why);
                        break;
                    }
                    // Not dropped: the next wait must return at once for it.
                    Ok(Notice::Notify(_)) => self.woken.store(true, Ordering::Relaxed),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                        self.set_lost("connection closed".into());
                        break;
                    }
                }
            }
        }
        self.lost.lock().ok().and_then(|g| g.clone())
    }

    fn set_lost(&self, why: String) {
        if let Ok(mut g) = self.lost.lock() {
            g.get_or_insert(why);
        }
    }

    /// Waits until a row for `schema` is committed, the connection dies, or `max` passes.
    async fn wait(&self, schema: &str, max: Duration) {
        if self.woken.swap(false, Ordering::Relaxed) {
            return;
        }
        let mut rx = self.rx.lock().await;
        let deadline = tokio::time::Instant::now() + max;
        loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => return,
                Ok(Some(Notice::Notify(s))) if s == schema => {
                    // Notifications that queued up while a batch was out all ask for the
                    // same thing: one claim. Drain them so they do not cause empty claims.
                    while let Ok(n) = rx.try_recv() {
                        if let Notice::Closed(why) = n {
                            self.set_lost(why);
                        }
                    }
                    return;
                }
                Ok(Some(Notice::Notify(_))) => continue,
                Ok(Some(Notice::Closed(why))) => {
                    self.set_lost(why);
                    return;
                }
                Ok(None) => {
                    self.set_lost("connection closed".into());
                    return;
                }
            }
        }
    }
}

/// Sleeps for `d` unless cancelled first; returns true when cancelled.
async fn wait(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = cancel.cancelled() => true,
    }
}
