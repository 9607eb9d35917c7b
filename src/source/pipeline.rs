//! The lead loop of one source, as a state machine: claim, hand over, land, settle.
//!
//! An idle source polls nothing: a committed row's notification, or the database's
//! look for pending rows every `process_interval` (one statement for all its
//! sources, `crate::database`), wakes it.
//!
//! Pipelined: up to `in_flight_batches` batches are with the producer at once; while
//! they wait for Kafka's acknowledgements the next batch is claimed (excluding every id
//! still with the producer or not yet deleted) and landed batches are settled (deleted,
//! retried, dead-lettered) together, off the publishing path. Batches land in the order
//! they were sent. An aggregate whose event failed holds back its events claimed before
//! that failure was recorded; later claims skip them in SQL.
//!
//! [`Pipeline`] keeps the state and its transitions (`on_claimed`, `on_landed`,
//! `on_settled`, ...); [`lead`] is the `select!` that drives them. The outside world
//! (PostgreSQL for claims and settles, Kafka for publishing) is behind [`Ports`], so the
//! transitions are tested here on tokio's paused clock without either.
//!
//! About 850 lines: one state type and its transitions, kept in one file so each
//! transition reads beside the state it changes; the slots, the ports, the idle states
//! and the tests live beside it in `pipeline/`.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};
use futures::FutureExt;
use prometheus::Histogram;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::db::{DbError, DbErrorKind, Notice};
use crate::event::Event;
use crate::health::SourceHealth;
use crate::metrics::Metrics;
use crate::sink::{Acks, Blame, Failure};

use super::holds::{Aggregate, Holds};
use super::outage::{Outage, Problem};
use super::settle::Settlement;
use idle::{repoll_after, Idle, QUIET, REPOLL};
pub use ports::{Ended, Handover, Landed, Limits, Ports, SettleOutcome};
use slots::{ClaimSlot, Claimed, Gate, SettleSlot};

mod idle;
mod ports;
mod slots;

/// Claimed batches kept waiting for a producer slot, at most.
const READY_AHEAD: usize = 2;
/// How long delivered rows may wait for their delete while claims run back to back.
pub const SETTLE_DEFER_MAX: Duration = Duration::from_millis(10);
/// How long delivered rows may wait for their delete at light load, so that one
/// statement deletes the batches of many claims: a delete costs the relay and the
/// server as much as a claim, and nothing waits for it.
pub const SETTLE_LINGER: Duration = Duration::from_millis(25);

/// A claimed batch waiting for room with the producer.
struct Ready {
    events: Vec<Event>,
    /// Settles done when its claim started.
    gen: u64,
    claimed_at: Instant,
}

/// A batch back from the producer, before its outcomes are filed.
struct Flown {
    seq: u64,
    batch: Vec<Event>,
    settlement: Settlement,
    results: Vec<(usize, Result<(), Failure>)>,
    /// Aggregates added to the holds when the batch was sent.
    counted: HashSet<Aggregate>,
    claimed_at: Instant,
    sent_at: Instant,
}

/// The observers of one source: its name, metrics and health.
pub struct Observers<'a> {
    /// The source's name.
    pub name: &'a str,
    /// The source's schema (the payload of its wake-ups).
    pub schema: &'a str,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// Health.
    pub health: &'a SourceHealth,
    /// Fault injection for tests.
    #[cfg(feature = "test-hooks")]
    pub hooks: &'a super::TestHooks,
}

/// One source's lead loop state.
pub struct Pipeline<'a, P: Ports> {
    ports: &'a P,
    limits: Limits,
    obs: Observers<'a>,
    publish_hist: Histogram,
    batch_hist: Histogram,
    e2e_hist: Histogram,
    db_outage: &'a mut Outage,
    kafka_outage: Outage,
    /// The first flight sent after Kafka failed: only its landing proves recovery.
    kafka_retry_from: u64,
    claim: ClaimSlot,
    want_claim: bool,
    /// Claimed, not yet sent: a claim returns while the slots are still taken.
    ready: VecDeque<Ready>,
    flights: FuturesOrdered<BoxFuture<'static, Flown>>,
    /// Ids with the producer, or delivered and not yet deleted, per flight.
    owned: VecDeque<(u64, Vec<i64>)>,
    next_seq: u64,
    /// Rows in the batches with the producer.
    rows_out: usize,
    landed: Vec<Landed>,
    /// Rows in `landed`, and when its first batch landed.
    landed_rows: usize,
    landed_since: Instant,
    settling: SettleSlot,
    settles_done: u64,
    holds: Holds,
    gate: Gate,
    /// Whether the source waits for rows (inserts notify) or works.
    idle: Idle,
    /// A claim found nothing and the source has not announced waiting yet.
    announce: bool,
    /// Announcements in a row that found an insert in flight.
    announce_fails: u32,
    /// When to claim again without a wake-up (after a short claim, or an announcement
    /// that found an insert in flight).
    repoll_at: Option<Instant>,
    /// When a claim last found rows.
    rows_at: Option<Instant>,
    /// Rows the next claim asks for: `batch_size` while traffic is light, doubling up to
    /// `max_batch_size` while claims come back full (a backlog), halving back while they
    /// come back less than half full.
    batch: usize,
    listening: bool,
    /// The lock may be another replica's: nothing more is claimed, sent or settled;
    /// what is with the producer lands unsettled and goes out again from the outbox.
    fenced: bool,
}

impl<'a, P: Ports> Pipeline<'a, P> {
    /// A pipeline that has claimed nothing yet and claims at once.
    pub fn new(
        ports: &'a P,
        limits: Limits,
        obs: Observers<'a>,
        db_outage: &'a mut Outage,
    ) -> Pipeline<'a, P> {
        let (publish_hist, batch_hist, e2e_hist) = obs.metrics.source_histograms(obs.name);
        let batch_size = limits.batch_size.max(1);
        Pipeline {
            ports,
            limits,
            obs,
            publish_hist,
            batch_hist,
            e2e_hist,
            db_outage,
            kafka_outage: Outage::new(),
            kafka_retry_from: 0,
            claim: ClaimSlot::Idle,
            want_claim: true,
            ready: VecDeque::new(),
            flights: FuturesOrdered::new(),
            owned: VecDeque::new(),
            next_seq: 0,
            rows_out: 0,
            landed: Vec::new(),
            landed_rows: 0,
            landed_since: Instant::now(),
            settling: SettleSlot::default(),
            settles_done: 0,
            holds: Holds::default(),
            gate: Gate::default(),
            batch: batch_size,
            idle: Idle::Busy,
            announce: false,
            announce_fails: 0,
            repoll_at: None,
            rows_at: None,
            listening: true,
            fenced: false,
        }
    }

    /// Ending, and nothing is left out: the reason. While ending, nothing new goes out.
    fn finished(&mut self) -> Option<Ended> {
        self.gate.ending.as_ref()?;
        self.ready.clear();
        self.want_claim = false;
        if self.flights.is_empty()
            && self.landed.is_empty()
            && !self.settling.is_running()
            && !self.claim.is_running()
        {
            return self.gate.ending.take();
        }
        None
    }

    /// Drops holds no live claim needs, and ends quiescing once every flight landed.
    fn tidy(&mut self) {
        if !self.holds.is_empty() {
            let oldest = self
                .ready
                .iter()
                .map(|r| r.gen)
                .chain(self.claim.gen())
                .min()
                .unwrap_or(u64::MAX);
            self.holds.prune(oldest);
        }
        if self.gate.quiesce && self.flights.is_empty() {
            self.gate.quiesce = false;
        }
    }

    /// Whether the next claim may start now: one is wanted, the gate is open, few
    /// claimed batches wait for a slot, none is running, and every failure is recorded
    /// (the claim could not skip the failed aggregates yet).
    fn may_claim(&self) -> bool {
        if !(self.want_claim
            && self.gate.ending.is_none()
            && self.gate.open()
            && !self.claim.is_running()
            && self.holds.all_settled())
        {
            return false;
        }
        // Ready batches that go out at once do not count as waiting.
        let (depth, full) = (self.limits.in_flight.max(1), self.batch);
        let (mut out, mut rows) = (self.flights.len(), self.rows_out);
        let free = self
            .ready
            .iter()
            .take_while(|r| {
                let fits = room(depth, full, out, rows, r.events.len());
                out += 1;
                rows += r.events.len();
                fits
            })
            .count();
        self.ready.len().saturating_sub(free) < READY_AHEAD
    }

    /// Starts the next claim if it may start; true if it did. It starts before the
    /// ready batches are handed over, so PostgreSQL reads while this task works, and
    /// leaves out their ids with the ones in flight.
    async fn start_claim(&mut self, _cancel: &CancellationToken) -> bool {
        if !self.may_claim() {
            return false;
        }
        #[cfg(feature = "test-hooks")]
        {
            if self.obs.hooks.panic_once.swap(false, Ordering::Relaxed) {
                panic!("injected panic in source {}", self.obs.name);
            }
            while self.obs.hooks.stall.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = _cancel.cancelled() => break,
                }
            }
        }
        self.want_claim = false;
        let exclude: Vec<i64> = self
            .owned
            .iter()
            .flat_map(|(_, ids)| ids.iter().copied())
            .chain(
                self.ready
                    .iter()
                    .flat_map(|r| r.events.iter().map(|e| e.id)),
            )
            .collect();
        self.claim = ClaimSlot::Running {
            task: self.ports.claim(self.batch, exclude),
            limit: self.batch,
            gen: self.settles_done,
            started: Instant::now(),
            stale: false,
        };
        true
    }

    /// Claimed batches go out while there is room, each filtered by the holds as they
    /// stand after the one before it.
    fn hand_over_ready(&mut self) {
        let (depth, full) = (self.limits.in_flight.max(1), self.batch);
        while self.gate.open()
            && self.ready.front().is_some_and(|r| {
                room(
                    depth,
                    full,
                    self.flights.len(),
                    self.rows_out,
                    r.events.len(),
                )
            })
        {
            let Some(r) = self.ready.pop_front() else {
                break;
            };
            let claimed = r.events.len();
            let events: Vec<Event> = if self.holds.is_empty() {
                r.events
            } else {
                r.events
                    .into_iter()
                    .filter(|e| !self.holds.holds_back(e, r.gen))
                    .collect()
            };
            if events.len() < claimed {
                // The dropped rows stay in the outbox. Later batches, and the running
                // claim, left them out as taken and may hold their aggregates' later
                // events: those are claimed afresh.
                self.ready.clear();
                self.claim.mark_stale();
                self.want_claim = true;
            }
            if !events.is_empty() {
                self.send(events, r.claimed_at);
            }
        }
    }

    /// Hands one batch to the producer and adds it to the flights.
    fn send(&mut self, events: Vec<Event>, claimed_at: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.rows_out += events.len();
        self.owned
            .push_back((seq, events.iter().map(|e| e.id).collect()));
        let sent_at = Instant::now();
        let (settlement, acks) = self.hand_over(&events);
        // Failures known before the producer took the records hold their aggregates
        // now, not when the batch lands.
        let counted = settlement.held.clone();
        for key in &counted {
            self.holds.failed(key);
        }
        if let Some(f) = &settlement.transport {
            self.kafka_failed(seq, f);
        }
        self.flights.push_back(
            async move {
                Flown {
                    seq,
                    results: acks.await,
                    batch: events,
                    settlement,
                    counted,
                    claimed_at,
                    sent_at,
                }
            }
            .boxed(),
        );
    }

    /// Rows that fail before reaching the producer are filed here; an aggregate whose
    /// earlier row failed keeps its later rows of the batch in the outbox.
    fn hand_over(&self, batch: &[Event]) -> (Settlement, Acks) {
        let mut out = self.ports.batch();
        let mut s = Settlement::default();
        for (i, e) in batch.iter().enumerate() {
            if s.holds_back(e) {
                continue;
            }
            if let Err(f) = out.send(i, e) {
                self.note_failure(e, &f);
                if f.blame() == Blame::Transport {
                    // The producer cannot take more; the rest of the batch stays put.
                    s.stopped(&batch[i..], f);
                    break;
                }
                s.record(e, f, &self.limits.retry);
            }
        }
        (s, out.acks())
    }

    /// Starts a settle of the landed batches, unless one is running or it can wait.
    fn start_settle(&mut self) {
        if !self.fenced
            && !self.settling.is_running()
            && !self.landed.is_empty()
            && settle_now(
                Pending {
                    claim_running: self.claim.is_running(),
                    ending: self.gate.ending.is_some(),
                    deletes_only: self.landed.iter().all(|l| l.settlement.all_delivered()),
                    rows: self.landed_rows,
                    waited: self.landed_since.elapsed(),
                },
                self.limits.delete_batch_size.max(self.batch),
            )
        {
            self.landed_rows = 0;
            let done = std::mem::take(&mut self.landed);
            self.settling.0 = Some(self.ports.settle(done));
        }
    }

    /// A batch came back from the producer: file each outcome, and hold or pause as
    /// they say.
    fn on_landed(&mut self, flown: Flown) {
        let Flown {
            seq,
            batch,
            mut settlement,
            results,
            counted,
            claimed_at,
            sent_at,
        } = flown;
        for (i, r) in results {
            let e = &batch[i];
            match r {
                Ok(()) => settlement.delivered.push(e.id),
                Err(f) => {
                    self.note_failure(e, &f);
                    settlement.record(e, f, &self.limits.retry);
                }
            }
        }
        settlement.delivered.sort_unstable();
        let n = settlement.delivered.len() as u64;
        self.obs
            .metrics
            .published
            .with_label_values(&[self.obs.name])
            .inc_by(n);
        self.obs.health.processed.fetch_add(n, Ordering::Relaxed);

        self.rows_out -= batch.len();
        self.publish_hist.observe(sent_at.elapsed().as_secs_f64());
        self.batch_hist.observe(claimed_at.elapsed().as_secs_f64());
        let acked_at = SystemTime::now();
        for e in batch
            .iter()
            .filter(|e| settlement.delivered.binary_search(&e.id).is_ok())
        {
            if let Ok(age) = acked_at.duration_since(e.created_at) {
                self.e2e_hist.observe(age.as_secs_f64());
            }
        }
        for key in settlement.held.difference(&counted) {
            self.holds.failed(key);
        }
        match &settlement.transport {
            Some(f) => self.kafka_failed(seq, f),
            None if self.kafka_outage.active() && seq >= self.kafka_retry_from => {
                self.obs
                    .metrics
                    .kafka_outage
                    .with_label_values(&[self.obs.name])
                    .set(0);
                self.kafka_outage.recovered(self.obs.name);
            }
            None => {}
        }
        if self.fenced {
            // Not settled: the rows stay, and whoever holds the source now sends them
            // again (duplicates, never loss).
            return;
        }
        if self.landed.is_empty() {
            self.landed_since = Instant::now();
        }
        self.landed_rows += batch.len();
        self.landed.push(Landed {
            seq,
            batch,
            settlement,
        });
    }

    /// Kafka failed the batch sent as `seq`: pause (once per round of batches sent
    /// after the last failure), drop what was claimed, and send nothing new until every
    /// batch still out has landed (or failed) on its own.
    fn kafka_failed(&mut self, seq: u64, f: &Failure) {
        if seq >= self.kafka_retry_from {
            self.obs
                .metrics
                .kafka_outage
                .with_label_values(&[self.obs.name])
                .set(1);
            self.obs.health.set_error(f.message.clone());
            let pause = self.kafka_outage.failed(
                self.obs.name,
                Problem::KAFKA,
                &f.message,
                self.limits.retry.backoff_base,
            );
            self.gate.pause(pause);
            self.kafka_retry_from = self.next_seq;
        }
        self.ready.clear();
        self.claim.mark_stale();
        self.gate.quiesce = true;
    }

    /// A claim returned.
    fn on_claimed(&mut self, c: Claimed) {
        match c.result {
            Ok(_) if c.stale => self.want_claim = true,
            Ok(events) => {
                self.db_ok();
                let last_rows_at = self.rows_at;
                if !events.is_empty() {
                    self.rows_at = Some(c.started);
                }
                // A full batch says more rows are waiting: claim the next one now, while
                // this one waits for a slot, and a larger one.
                let full = events.len() >= c.limit;
                self.want_claim |= full;
                self.batch = next_batch(self.batch, c.limit, events.len(), &self.limits);
                if events.is_empty() {
                    if self.idle.holds_lock() {
                        // The last look found nothing: asleep until a wake-up.
                        self.idle = Idle::Waiting;
                    } else {
                        self.announce = self.limits.announce;
                    }
                } else if self.idle.holds_lock()
                    && events.len() == 1
                    && last_rows_at.is_none_or(|at| c.started.duration_since(at) >= QUIET)
                {
                    // One row after a quiet spell: most likely an event on its own.
                    // Keep waiting: the next insert notifies, and the source does not
                    // claim twice more (the look 3 ms later, then the one after the
                    // announcement) to learn what the lock already says: 100 tenants
                    // at 2.5 events/s each cost a hot source's drain a quarter of its
                    // speed that way on a 2-core server (the scale bench). Steady
                    // traffic, or a burst, goes back to working without notifications.
                    self.idle = Idle::Waiting;
                } else {
                    self.work();
                    if !full {
                        // More are likely coming, and no notification will say so.
                        self.repoll_at = Some(Instant::now() + REPOLL);
                    }
                }
                if !events.is_empty() && self.gate.ending.is_none() {
                    self.ready.push_back(Ready {
                        events,
                        gen: c.gen,
                        claimed_at: c.started,
                    });
                }
            }
            Err(e) => {
                if e.kind() == DbErrorKind::NoConnection {
                    self.gate.ending.get_or_insert(Ended::NoConnection);
                }
                self.db_down(&e);
            }
        }
    }

    /// A settle finished: its failures are recorded (or not, if it failed: delivered
    /// rows that were not deleted go out again, duplicates, never loss).
    fn on_settled(&mut self, (done, r): SettleOutcome) {
        self.settles_done += 1;
        for l in &done {
            for key in &l.settlement.held {
                self.holds.settled(key, self.settles_done);
            }
            if self.owned.front().is_some_and(|(seq, _)| *seq == l.seq) {
                self.owned.pop_front();
            }
        }
        match r {
            Ok(()) => self.db_ok(),
            Err(e) => self.db_down(&e),
        }
    }

    /// A wake-up, or the lock's connection ended.
    fn on_notice(&mut self, n: Option<Notice>) {
        match n {
            Some(Notice::Notify(s)) if s == self.obs.schema => {
                if self.idle.holds_lock() {
                    // Still waiting: what the claim finds decides whether it works.
                    self.idle = Idle::Rechecking;
                } else {
                    self.work();
                }
                self.want_claim = true;
            }
            Some(Notice::Notify(_)) => {}
            Some(Notice::HandOver) => {
                self.gate.ending.get_or_insert(Ended::HandedOver);
            }
            Some(Notice::Closed(why)) => self.fence(why),
            None => self.fence("connection closed".into()),
        }
    }

    /// The lock may be another replica's by now: stop saying this one leads, claim,
    /// send and settle nothing more (a settle already running finishes within
    /// operation_timeout), and end once what is with the producer has landed.
    fn fence(&mut self, why: String) {
        self.obs.health.leader.store(false, Ordering::Relaxed);
        self.obs
            .metrics
            .source_leader
            .with_label_values(&[self.obs.name])
            .set(0);
        self.listening = false;
        self.fenced = true;
        self.landed.clear();
        self.landed_rows = 0;
        self.gate.ending.get_or_insert(Ended::LostLock(why));
    }

    /// The source has rows again: if it waited, inserts stop notifying.
    fn work(&mut self) {
        self.announce = false;
        self.announce_fails = 0;
        if self.idle.holds_lock() {
            self.ports.stop_waiting();
            self.idle = Idle::Busy;
        }
    }

    /// Whether to announce waiting now: a claim found nothing, and nothing else is to
    /// be done or in the way.
    fn may_announce(&self) -> bool {
        self.announce
            && matches!(self.idle, Idle::Busy)
            && !self.want_claim
            && !self.claim.is_running()
            && self.ready.is_empty()
            && self.gate.ending.is_none()
            && self.gate.open()
    }

    /// The waiting lock's answer.
    fn on_announced(&mut self, r: Result<bool, DbError>) {
        self.announce = false;
        match r {
            Ok(true) => {
                // Every insert that did not notify has ended: one last look.
                self.announce_fails = 0;
                self.idle = Idle::Rechecking;
                self.want_claim = true;
            }
            Ok(false) | Err(_) => {
                // An insert that did not notify is in flight (or the coordination
                // connection is in trouble, which ends the lead): claim again soon.
                self.repoll_at = Some(repoll_after(self.announce_fails));
                self.announce_fails += 1;
            }
        }
    }

    /// A pause ended.
    fn on_resume(&mut self) {
        self.gate.paused_until = None;
        self.want_claim = true;
    }

    fn note_failure(&self, e: &Event, f: &Failure) {
        self.obs
            .metrics
            .failed
            .with_label_values(&[self.obs.name, f.reason.label()])
            .inc();
        self.obs.health.failed.fetch_add(1, Ordering::Relaxed);
        if f.blame() != Blame::Transport {
            warn!(
                source = self.obs.name,
                event_id = %e.event_id,
                aggregate_id = %e.aggregate_id,
                correlation_id = e.correlation_id.as_deref().unwrap_or(""),
                trace_id = e.trace_id().unwrap_or(""),
                reason = f.reason.label(),
                error = %f.message,
                "publish failed"
            );
        }
    }

    /// A PostgreSQL operation failed: count it, show it, and pause.
    fn db_down(&mut self, e: &DbError) {
        let name = self.obs.name;
        self.obs
            .metrics
            .poll_errors
            .with_label_values(&[name])
            .inc();
        self.obs.metrics.source_up.with_label_values(&[name]).set(0);
        let text = e.to_string();
        self.obs.health.set_error(text.clone());
        let pause =
            self.db_outage
                .failed(name, Problem::of(e), &text, self.limits.retry.backoff_base);
        self.gate.pause(pause);
    }

    /// A PostgreSQL operation succeeded.
    fn db_ok(&mut self) {
        if self.db_outage.active() {
            self.db_outage.recovered(self.obs.name);
            self.obs
                .metrics
                .source_up
                .with_label_values(&[self.obs.name])
                .set(1);
        }
    }
}

/// Drives the pipeline until the source's lock is lost or `cancel`, then lets what is
/// out land and settle before returning. Cancellation is checked between steps, never
/// between "publish" and "settle".
pub async fn lead<P: Ports>(
    mut p: Pipeline<'_, P>,
    notices: &mut UnboundedReceiver<Notice>,
    cancel: &CancellationToken,
) -> Ended {
    loop {
        p.obs.health.beat();
        if cancel.is_cancelled() {
            p.gate.ending.get_or_insert(Ended::Cancelled);
        }
        if let Some(ended) = p.finished() {
            return ended;
        }
        p.tidy();
        if p.start_claim(cancel).await {
            // Let the claim's task start its query before this task hands a batch to
            // the producer: a task spawned from a worker waits in that worker's
            // unstealable next-task slot until the spawner yields, and a send of a
            // thousand records held the claim back 3 ms at the median, 20 ms at worst.
            tokio::task::yield_now().await;
        }
        p.hand_over_ready();
        p.start_settle();
        if p.may_announce() {
            p.idle = Idle::Announcing(p.ports.wait_for_rows());
        }
        let paused_until = p.gate.paused_until;
        let repoll_at = p
            .repoll_at
            .filter(|_| !p.claim.is_running() && !p.want_claim);
        let defer_until = p.landed_since
            + if p.landed.iter().all(|l| l.settlement.all_delivered()) {
                SETTLE_LINGER
            } else {
                SETTLE_DEFER_MAX
            };
        let defer_armed = !p.settling.is_running() && !p.landed.is_empty();
        let ending = p.gate.ending.is_some();
        // Nothing out, nothing running, no timer: only a wake-up (a notification, the
        // database's look for pending rows) or the end of the lead comes next. A parked
        // task is idle, not stuck.
        p.obs.health.park(
            p.flights.is_empty()
                && !p.claim.is_running()
                && !p.settling.is_running()
                && p.landed.is_empty()
                && paused_until.is_none()
                && repoll_at.is_none()
                && !p.idle.is_announcing()
                && p.ready.is_empty(),
        );
        tokio::select! {
            Some(f) = p.flights.next(), if !p.flights.is_empty() => p.on_landed(f),
            c = p.claim.wait(), if p.claim.is_running() => p.on_claimed(c),
            s = p.settling.wait(), if p.settling.is_running() => p.on_settled(s),
            n = notices.recv(), if p.listening => p.on_notice(n),
            r = p.idle.announced(), if p.idle.is_announcing() => p.on_announced(r),
            _ = tokio::time::sleep_until(repoll_at.unwrap_or_else(Instant::now)),
                if repoll_at.is_some() => {
                p.repoll_at = None;
                p.want_claim = true;
            }
            _ = tokio::time::sleep_until(paused_until.unwrap_or_else(Instant::now)),
                if paused_until.is_some() => p.on_resume(),
            _ = tokio::time::sleep_until(defer_until), if defer_armed => {}
            _ = cancel.cancelled(), if !ending => {}
        }
    }
}

/// The size of the next claim after one of `limit` rows returned `got`: twice as large
/// after a full one (up to `max_batch_size`), half as large after one less than half
/// full (down to `batch_size`), else the same. A backlog is drained in large claims
/// whatever `batch_size` says, and light traffic goes back to `batch_size`.
fn next_batch(current: usize, limit: usize, got: usize, l: &Limits) -> usize {
    let (min, max) = (
        l.batch_size.max(1),
        l.max_batch_size.max(l.batch_size).max(1),
    );
    if got >= limit {
        (current * 2).min(max)
    } else if got * 2 < limit {
        (current / 2).max(min)
    } else {
        current
    }
}

/// Whether a batch of `rows` may go out while `out` batches of `rows_out` rows are with
/// the producer: fewer than `depth` batches, or, pipelining, no more than `depth` full
/// batches' worth of rows. Light traffic claims a row or two at a time, and those small
/// batches must not wait behind each other's acknowledgements (at 1,000 events/s four
/// slots held an event back 3 ms at the 90th percentile).
fn room(depth: usize, full: usize, out: usize, rows_out: usize, rows: usize) -> bool {
    out < depth || (depth > 1 && rows_out + rows <= depth * full)
}

/// What is waiting to be settled.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// A claim is running.
    claim_running: bool,
    /// The lead is ending: everything landed is settled now.
    ending: bool,
    /// Every landed event was delivered (a delete only: no failure waits to be recorded).
    deletes_only: bool,
    /// Rows landed.
    rows: usize,
    /// Since the first of them landed.
    waited: Duration,
}

/// Whether the batches that landed are settled now. Failures are recorded at once
/// (the next claim waits for them), unless a claim is running: a settle then waits for
/// it, at most [`SETTLE_DEFER_MAX`] (at light load a delete beside the claim slowed the
/// claim: at 1,000 events/s the commit-to-send p99 fell from 4.4 ms to a median of
/// 2.4 ms over six runs). Deletes alone wait for a full `delete_batch` or
/// [`SETTLE_LINGER`], so that at light load one delete covers many claims (at 1,000
/// events/s and a claim every 2 ms, 40 deletes a second instead of 400).
fn settle_now(p: Pending, delete_batch: usize) -> bool {
    if p.ending || p.rows >= delete_batch {
        return true;
    }
    if p.deletes_only {
        p.waited >= SETTLE_LINGER
    } else {
        !p.claim_running || p.waited >= SETTLE_DEFER_MAX
    }
}

#[cfg(test)]
mod tests;
