//! The pipeline's transitions on tokio's paused clock. The ports are scripted: each
//! claim, hand-over and settle shows up on a channel, and the test answers it when the
//! scenario says, so every interleaving is chosen, not raced.
//!
//! About 700 lines: one scenario per transition of the pipeline, on one shared harness
//! (the scripted ports and their helpers at the top); splitting them would split the
//! harness from its users.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::idle::{REPOLL, REPOLL_MAX};
use super::*;
use crate::config::{AfterDeadLetter, RetrySettings};
use crate::sink::Reason;

/// Long enough that no scenario waits on it by accident.
const WAIT: Duration = Duration::from_secs(600);

struct ClaimCall {
    /// The rows it asked for.
    limit: usize,
    exclude: Vec<i64>,
    reply: oneshot::Sender<Result<Vec<Event>, DbError>>,
}

struct PublishCall {
    /// (index in the batch, id) of each event handed over.
    sent: Vec<(usize, i64)>,
    reply: oneshot::Sender<Vec<(usize, Result<(), Failure>)>>,
}

impl PublishCall {
    fn ids(&self) -> Vec<i64> {
        self.sent.iter().map(|(_, id)| *id).collect()
    }

    /// Answers every record: `outcome(id)`.
    fn answer(self, outcome: impl Fn(i64) -> Result<(), Failure>) {
        let results = self.sent.iter().map(|(i, id)| (*i, outcome(*id))).collect();
        let _ = self.reply.send(results);
    }
}

struct WaitCall {
    reply: oneshot::Sender<Result<bool, DbError>>,
}

struct SettleCall {
    delivered: Vec<i64>,
    retries: Vec<i64>,
    dead: Vec<i64>,
    reply: oneshot::Sender<Result<(), DbError>>,
}

struct Script {
    claims: mpsc::UnboundedSender<ClaimCall>,
    publishes: mpsc::UnboundedSender<PublishCall>,
    settles: mpsc::UnboundedSender<SettleCall>,
    waits: mpsc::UnboundedSender<WaitCall>,
    stops: mpsc::UnboundedSender<()>,
}

struct ScriptBatch {
    sent: Vec<(usize, i64)>,
    publishes: mpsc::UnboundedSender<PublishCall>,
}

impl Handover for ScriptBatch {
    fn send(&mut self, i: usize, e: &Event) -> Result<(), Failure> {
        self.sent.push((i, e.id));
        Ok(())
    }

    fn acks(self) -> Acks {
        let (reply, answer) = oneshot::channel();
        let _ = self.publishes.send(PublishCall {
            sent: self.sent,
            reply,
        });
        async move { answer.await.unwrap_or_default() }.boxed()
    }
}

impl Ports for Script {
    type Batch = ScriptBatch;

    fn claim(
        &self,
        limit: usize,
        exclude: Vec<i64>,
    ) -> BoxFuture<'static, Result<Vec<Event>, DbError>> {
        let (reply, answer) = oneshot::channel();
        let _ = self.claims.send(ClaimCall {
            limit,
            exclude,
            reply,
        });
        async move {
            answer
                .await
                .unwrap_or_else(|_| Err(DbError::other("claim", "no answer")))
        }
        .boxed()
    }

    fn batch(&self) -> ScriptBatch {
        ScriptBatch {
            sent: Vec::new(),
            publishes: self.publishes.clone(),
        }
    }

    fn wait_for_rows(&self) -> BoxFuture<'static, Result<bool, DbError>> {
        let (reply, answer) = oneshot::channel();
        let _ = self.waits.send(WaitCall { reply });
        async move {
            answer
                .await
                .unwrap_or_else(|_| Err(DbError::other("wait", "the test dropped it")))
        }
        .boxed()
    }

    fn stop_waiting(&self) {
        let _ = self.stops.send(());
    }

    fn settle(&self, landed: Vec<Landed>) -> BoxFuture<'static, SettleOutcome> {
        let (reply, answer) = oneshot::channel();
        let all = |f: fn(&Settlement) -> Vec<i64>| -> Vec<i64> {
            landed.iter().flat_map(|l| f(&l.settlement)).collect()
        };
        let _ = self.settles.send(SettleCall {
            delivered: all(|s| s.delivered.clone()),
            retries: all(|s| s.retries.iter().map(|r| r.0).collect()),
            dead: all(|s| s.dead.iter().map(|d| d.0).collect()),
            reply,
        });
        async move {
            let r = answer
                .await
                .unwrap_or_else(|_| Err(DbError::other("settle", "no answer")));
            (landed, r)
        }
        .boxed()
    }
}

/// A pipeline running on its own task, and the other ends of its ports.
struct Harness {
    claims: mpsc::UnboundedReceiver<ClaimCall>,
    publishes: mpsc::UnboundedReceiver<PublishCall>,
    settles: mpsc::UnboundedReceiver<SettleCall>,
    waits: mpsc::UnboundedReceiver<WaitCall>,
    stops: mpsc::UnboundedReceiver<()>,
    notices: mpsc::UnboundedSender<Notice>,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
    task: JoinHandle<Ended>,
}

fn limits(batch_size: usize, in_flight: usize) -> Limits {
    Limits {
        batch_size,
        max_batch_size: batch_size,
        announce: true,
        in_flight,
        delete_batch_size: 100,
        retry: RetrySettings {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            after_dead_letter: AfterDeadLetter::Continue,
        },
    }
}

fn start(limits: Limits) -> Harness {
    let (claims_tx, claims) = mpsc::unbounded_channel();
    let (publishes_tx, publishes) = mpsc::unbounded_channel();
    let (settles_tx, settles) = mpsc::unbounded_channel();
    let (waits_tx, waits) = mpsc::unbounded_channel();
    let (stops_tx, stops) = mpsc::unbounded_channel();
    let (notices, mut notices_rx) = mpsc::unbounded_channel();
    let cancel = CancellationToken::new();
    let metrics = Arc::new(Metrics::new(&["s"]));
    let (m, c) = (metrics.clone(), cancel.clone());
    let task = tokio::spawn(async move {
        let script = Script {
            claims: claims_tx,
            publishes: publishes_tx,
            settles: settles_tx,
            waits: waits_tx,
            stops: stops_tx,
        };
        let health = SourceHealth::new();
        #[cfg(feature = "test-hooks")]
        let hooks = crate::source::TestHooks::default();
        let obs = Observers {
            name: "s",
            schema: "s",
            metrics: &m,
            health: &health,
            #[cfg(feature = "test-hooks")]
            hooks: &hooks,
        };
        let mut outage = Outage::new();
        let p = Pipeline::new(&script, limits, obs, &mut outage);
        lead(p, &mut notices_rx, &c).await
    });
    Harness {
        claims,
        publishes,
        settles,
        waits,
        stops,
        notices,
        cancel,
        metrics,
        task,
    }
}

/// Cancels the lead and answers whatever it still asks (claims find nothing, records
/// are acknowledged, settles succeed) until it ends.
async fn finish(h: Harness) -> Ended {
    h.cancel.cancel();
    ended(h).await
}

/// Answers whatever the lead still asks until it ends by itself.
async fn ended(mut h: Harness) -> Ended {
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::select! {
            r = &mut h.task => return r.expect("the lead panicked"),
            Some(c) = h.claims.recv() => { let _ = c.reply.send(Ok(vec![])); }
            Some(p) = h.publishes.recv() => p.answer(|_| Ok(())),
            Some(s) = h.settles.recv() => { let _ = s.reply.send(Ok(())); }
            Some(w) = h.waits.recv() => { let _ = w.reply.send(Ok(true)); }
            _ = tokio::time::sleep_until(deadline) => panic!("the lead did not end within {WAIT:?}"),
        }
    }
}

/// Answers the next claim with `events`.
async fn claim_returns(h: &mut Harness, events: Vec<Event>) -> Vec<i64> {
    let c = next(&mut h.claims, "claim").await;
    let exclude = c.exclude.clone();
    c.reply.send(Ok(events)).expect("the claim is awaited");
    exclude
}

/// The next call on `rx`, which must come.
async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
        .unwrap_or_else(|| panic!("the pipeline ended before a {what}"))
}

/// Asserts that nothing arrives on `rx` for `d` (of paused time: every timer of the
/// pipeline within `d` fires meanwhile).
async fn none_for<T>(rx: &mut mpsc::UnboundedReceiver<T>, d: Duration, what: &str) {
    if let Ok(Some(_)) = tokio::time::timeout(d, rx.recv()).await {
        panic!("a {what} came within {d:?}");
    }
}

fn event(id: i64, aggregate: &str) -> Event {
    Event::sample(id, aggregate)
}

fn failure(reason: Reason) -> Failure {
    Failure {
        reason,
        message: format!("{reason:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_event_holds_back_its_aggregate_in_a_batch_claimed_before_the_failure() {
    let mut h = start(limits(2, 2));
    assert!(claim_returns(&mut h, vec![event(1, "A"), event(2, "B")])
        .await
        .is_empty());
    let p1 = next(&mut h.publishes, "hand-over").await;
    assert_eq!(p1.ids(), [1, 2]);
    // A full batch: the next claim starts while the first is out, leaving its ids out.
    let c2 = next(&mut h.claims, "claim").await;
    assert_eq!(c2.exclude, [1, 2]);
    p1.answer(|id| {
        if id == 1 {
            Err(failure(Reason::UnknownTopic))
        } else {
            Ok(())
        }
    });
    let s1 = next(&mut h.settles, "settle").await;
    assert_eq!(
        (s1.delivered.as_slice(), s1.retries.as_slice()),
        (&[2][..], &[1][..])
    );
    // The claim that started before A's failure returns A's next event: it must wait.
    c2.reply
        .send(Ok(vec![event(3, "A"), event(4, "B")]))
        .unwrap();
    let p2 = next(&mut h.publishes, "hand-over").await;
    assert_eq!(
        p2.ids(),
        [4],
        "A's later event went out before A's failure was recorded"
    );
    // No claim until the failure is recorded: the claim's SQL could not skip A yet.
    none_for(&mut h.claims, Duration::from_secs(5), "claim").await;
    s1.reply.send(Ok(())).unwrap();
    let c3 = claim_returns(&mut h, vec![]).await;
    assert_eq!(c3, [4], "the dropped row is back in the outbox, claimable");
    p2.answer(|_| Ok(()));
    let s2 = next(&mut h.settles, "settle").await;
    assert_eq!(s2.delivered, [4]);
    s2.reply.send(Ok(())).unwrap();
    assert_eq!(finish(h).await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_transport_failure_pauses_and_sends_nothing_new_until_every_batch_out_has_landed() {
    let mut h = start(limits(1, 2));
    claim_returns(&mut h, vec![event(1, "A")]).await;
    let p1 = next(&mut h.publishes, "hand-over").await;
    claim_returns(&mut h, vec![event(2, "B")]).await;
    let p2 = next(&mut h.publishes, "hand-over").await;
    assert_eq!((p1.ids(), p2.ids()), (vec![1], vec![2]));
    let c3 = next(&mut h.claims, "claim").await;
    p1.answer(|_| Err(failure(Reason::Transport)));
    let outage = h.metrics.kafka_outage.with_label_values(&["s"]);
    let s1 = next(&mut h.settles, "settle").await;
    assert!(s1.delivered.is_empty() && s1.retries.is_empty() && s1.dead.is_empty());
    assert_eq!(outage.get(), 1, "the outage shows at once");
    s1.reply.send(Ok(())).unwrap();
    c3.reply.send(Ok(vec![event(3, "C")])).unwrap();
    // The pause (at most 100 ms) ends, but batch 2 is still out: quiet.
    none_for(&mut h.publishes, Duration::from_secs(5), "hand-over").await;
    none_for(&mut h.claims, Duration::from_secs(1), "claim").await;
    p2.answer(|_| Ok(()));
    // Every batch landed: A's event is claimed again (row 2 was delivered; its delete
    // may still be on its way) and goes out.
    let c4 = next(&mut h.claims, "claim").await;
    assert!(!c4.exclude.contains(&1), "{:?}", c4.exclude);
    let s2 = next(&mut h.settles, "settle").await;
    assert_eq!(s2.delivered, [2]);
    s2.reply.send(Ok(())).unwrap();
    c4.reply.send(Ok(vec![event(1, "A")])).unwrap();
    let p4 = next(&mut h.publishes, "hand-over").await;
    assert_eq!(p4.ids(), [1]);
    assert_eq!(
        outage.get(),
        1,
        "no batch sent after the failure has landed yet"
    );
    p4.answer(|_| Ok(()));
    let s4 = next(&mut h.settles, "settle").await;
    assert_eq!(s4.delivered, [1]);
    assert_eq!(
        outage.get(),
        0,
        "a batch sent after the failure landed: Kafka is back"
    );
    s4.reply.send(Ok(())).unwrap();
    assert_eq!(finish(h).await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_claim_running_when_kafka_fails_is_dropped_and_claimed_afresh() {
    let mut h = start(limits(1, 2));
    claim_returns(&mut h, vec![event(1, "A")]).await;
    let p1 = next(&mut h.publishes, "hand-over").await;
    // This claim left row 1 out as in flight; row 1 fails and stays in the outbox.
    let c2 = next(&mut h.claims, "claim").await;
    assert_eq!(c2.exclude, [1]);
    p1.answer(|_| Err(failure(Reason::Transport)));
    next(&mut h.settles, "settle")
        .await
        .reply
        .send(Ok(()))
        .unwrap();
    // Row 2 is A's next event, claimed while row 1 was out: it must never go first.
    c2.reply.send(Ok(vec![event(2, "A")])).unwrap();
    let c3 = claim_returns(&mut h, vec![event(1, "A")]).await;
    assert!(c3.is_empty(), "{c3:?}");
    let p3 = next(&mut h.publishes, "hand-over").await;
    assert_eq!(
        p3.ids(),
        [1],
        "the stale claim's row went out before A's first"
    );
    p3.answer(|_| Ok(()));
    assert_eq!(finish(h).await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_the_batches_out_land_and_settle_and_sends_nothing_new() {
    let mut h = start(limits(2, 2));
    claim_returns(&mut h, vec![event(1, "A"), event(2, "B")]).await;
    let p1 = next(&mut h.publishes, "hand-over").await;
    let c2 = next(&mut h.claims, "claim").await;
    h.cancel.cancel();
    c2.reply.send(Ok(vec![event(3, "C")])).unwrap();
    none_for(&mut h.publishes, Duration::from_secs(5), "hand-over").await;
    assert!(!h.task.is_finished(), "ended with a batch out");
    p1.answer(|_| Ok(()));
    let s1 = next(&mut h.settles, "settle").await;
    assert_eq!(s1.delivered, [1, 2]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        !h.task.is_finished(),
        "ended before the delivered rows were deleted"
    );
    s1.reply.send(Ok(())).unwrap();
    let r = tokio::time::timeout(WAIT, &mut h.task).await;
    assert_eq!(r.expect("the lead ended").unwrap(), Ended::Cancelled);
    assert!(
        h.claims.recv().await.is_none(),
        "a claim started while ending"
    );
    assert!(
        h.publishes.recv().await.is_none(),
        "a batch went out while ending"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_lock_fences_the_source_it_lands_what_is_out_and_settles_nothing() {
    // Batches of one: a full batch starts the next claim at once.
    let mut h = start(limits(1, 2));
    claim_returns(&mut h, vec![event(1, "A")]).await;
    let p1 = next(&mut h.publishes, "hand-over").await;
    // Landed before the lock was lost, waiting for the running claim to settle.
    let c2 = next(&mut h.claims, "claim").await;
    p1.answer(|_| Ok(()));
    h.notices
        .send(Notice::Closed("terminating connection".into()))
        .unwrap();
    // The lead sees the lost lock before the running claim returns.
    tokio::time::sleep(Duration::from_millis(1)).await;
    c2.reply.send(Ok(vec![event(2, "B")])).unwrap();
    none_for(&mut h.publishes, Duration::from_secs(5), "hand-over").await;
    none_for(&mut h.claims, Duration::from_secs(5), "claim").await;
    none_for(&mut h.settles, Duration::from_secs(5), "settle").await;
    assert_eq!(
        ended(h).await,
        Ended::LostLock("terminating connection".into())
    );
}

#[tokio::test(start_paused = true)]
async fn a_lost_lock_waits_for_what_is_with_the_producer_without_settling_it() {
    let mut h = start(limits(10, 2));
    claim_returns(&mut h, vec![event(1, "A")]).await;
    let p1 = next(&mut h.publishes, "hand-over").await;
    h.notices
        .send(Notice::Closed("terminating connection".into()))
        .unwrap();
    none_for(&mut h.claims, Duration::from_secs(5), "claim").await;
    assert!(!h.task.is_finished(), "ended with a batch out");
    p1.answer(|_| Ok(()));
    none_for(&mut h.settles, Duration::from_secs(5), "settle").await;
    assert_eq!(
        ended(h).await,
        Ended::LostLock("terminating connection".into())
    );
}

#[tokio::test(start_paused = true)]
async fn a_claim_without_a_free_connection_gives_the_source_up_once_what_is_out_settled() {
    let mut h = start(limits(1, 2));
    claim_returns(&mut h, vec![event(1, "A")]).await;
    let p1 = next(&mut h.publishes, "hand-over").await;
    let c2 = next(&mut h.claims, "claim").await;
    c2.reply
        .send(Err(DbError::NoConnection {
            what: "claim: pool".into(),
            after: Duration::from_secs(1),
        }))
        .unwrap();
    none_for(&mut h.claims, Duration::from_secs(5), "claim").await;
    assert!(!h.task.is_finished(), "gave up with a batch out");
    p1.answer(|_| Ok(()));
    let s1 = next(&mut h.settles, "settle").await;
    assert_eq!(s1.delivered, [1]);
    s1.reply.send(Ok(())).unwrap();
    assert_eq!(ended(h).await, Ended::NoConnection);
}

#[tokio::test(start_paused = true)]
async fn a_wake_up_for_its_own_schema_claims_at_once() {
    let mut h = start(limits(10, 2));
    claim_returns(&mut h, vec![]).await;
    h.notices.send(Notice::Notify("other".into())).unwrap();
    none_for(&mut h.claims, Duration::from_secs(60), "claim").await;
    h.notices.send(Notice::Notify("s".into())).unwrap();
    let started = Instant::now();
    claim_returns(&mut h, vec![]).await;
    assert!(started.elapsed() < Duration::from_millis(1));
    assert_eq!(finish(h).await, Ended::Cancelled);
}

#[test]
fn one_in_flight_batch_is_strict_and_small_batches_count_by_their_rows() {
    // Nothing out: any batch goes, however large.
    assert!(room(1, 100, 0, 0, 100));
    assert!(room(4, 100, 0, 0, 100));
    // in_flight_batches = 1 waits for the batch out, even a one-row one.
    assert!(!room(1, 100, 1, 1, 1));
    // Four full batches out: no room, not even for one row.
    assert!(!room(4, 100, 4, 400, 1));
    // Fewer than four batches out: room, whatever their size.
    assert!(room(4, 100, 3, 300, 100));
    // Forty one-row batches out: room for up to 360 more rows.
    assert!(room(4, 100, 40, 40, 100));
    assert!(room(4, 100, 300, 300, 100));
    assert!(!room(4, 100, 301, 301, 100));
    assert!(room(4, 100, 301, 301, 99));
}

#[test]
fn a_settle_waits_for_a_running_claim_only_within_bounds() {
    let short = Duration::from_millis(1);
    let failures = |claim_running, rows, waited| Pending {
        claim_running,
        ending: false,
        deletes_only: false,
        rows,
        waited,
    };
    assert!(
        settle_now(failures(false, 1, short), 100),
        "no claim running"
    );
    assert!(
        !settle_now(failures(true, 1, short), 100),
        "a claim is running"
    );
    assert!(
        settle_now(failures(true, 100, short), 100),
        "a full delete is waiting"
    );
    assert!(
        settle_now(failures(true, 1, SETTLE_DEFER_MAX), 100),
        "claims ran back to back for too long"
    );
    // Deletes alone linger to cover many claims, but not past a full batch, the
    // linger, or the end of the lead.
    let deletes = |claim_running, rows, waited| Pending {
        deletes_only: true,
        ..failures(claim_running, rows, waited)
    };
    assert!(!settle_now(deletes(false, 1, short), 100));
    assert!(!settle_now(deletes(false, 1, SETTLE_DEFER_MAX), 100));
    assert!(settle_now(deletes(false, 1, SETTLE_LINGER), 100));
    assert!(settle_now(deletes(false, 100, short), 100));
    assert!(!settle_now(deletes(true, 1, SETTLE_DEFER_MAX), 100));
    assert!(settle_now(
        Pending {
            ending: true,
            ..deletes(false, 1, short)
        },
        100
    ));
}

#[tokio::test(start_paused = true)]
async fn a_backlog_is_claimed_in_growing_batches_and_light_traffic_goes_back_to_batch_size() {
    let mut h = start(Limits {
        max_batch_size: 80,
        ..limits(10, 4)
    });
    // Kafka and the settles answer everything at once.
    let (_, idle) = mpsc::unbounded_channel();
    let mut publishes = std::mem::replace(&mut h.publishes, idle);
    tokio::spawn(async move {
        while let Some(p) = publishes.recv().await {
            p.answer(|_| Ok(()));
        }
    });
    let (_, idle) = mpsc::unbounded_channel();
    let mut settles = std::mem::replace(&mut h.settles, idle);
    tokio::spawn(async move {
        while let Some(s) = settles.recv().await {
            let _ = s.reply.send(Ok(()));
        }
    });
    let mut id = 0;
    let mut rows = |n: usize| -> Vec<Event> {
        (0..n)
            .map(|_| {
                id += 1;
                event(id, "A")
            })
            .collect()
    };
    // Full claims: each next one twice as large, up to max_batch_size.
    for want in [10, 20, 40, 80, 80] {
        let c = next(&mut h.claims, "claim").await;
        assert_eq!(c.limit, want, "a full claim grows the next");
        c.reply.send(Ok(rows(want))).unwrap();
    }
    // The backlog is gone: less than half full halves the next, down to batch_size.
    let c = next(&mut h.claims, "claim").await;
    assert_eq!(c.limit, 80);
    c.reply.send(Ok(rows(30))).unwrap();
    for want in [40, 20, 10, 10] {
        h.notices.send(Notice::Notify("s".into())).unwrap();
        let c = next(&mut h.claims, "claim").await;
        assert_eq!(c.limit, want, "light traffic shrinks the claims");
        c.reply.send(Ok(rows(1))).unwrap();
    }
    assert_eq!(finish(h).await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn nothing_to_claim_announces_waiting_then_looks_once_more_before_sleeping() {
    let mut h = start(limits(10, 2));
    claim_returns(&mut h, vec![]).await;
    let w = next(&mut h.waits, "announcement").await;
    none_for(&mut h.claims, Duration::from_secs(1), "claim").await;
    w.reply.send(Ok(true)).unwrap();
    // The lock is held: every insert that did not notify has ended; one last look.
    claim_returns(&mut h, vec![]).await;
    none_for(&mut h.claims, Duration::from_secs(3600), "claim").await;
    assert!(h.waits.try_recv().is_err(), "announced twice");
    // A wake-up: the source claims, still waiting; nothing found, it sleeps again.
    h.notices.send(Notice::Notify("s".into())).unwrap();
    claim_returns(&mut h, vec![]).await;
    none_for(&mut h.claims, Duration::from_secs(3600), "claim").await;
    assert!(h.stops.try_recv().is_err(), "stopped waiting for nothing");
    assert_eq!(finish(h).await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn one_row_found_while_waiting_keeps_waiting_and_a_burst_stops_it() {
    let mut h = start(limits(10, 2));
    claim_returns(&mut h, vec![]).await;
    next(&mut h.waits, "announcement")
        .await
        .reply
        .send(Ok(true))
        .unwrap();
    // A row committed just before the lock was held: the last look finds it. One row
    // is an event on its own: the source keeps waiting (the next insert notifies) and
    // does not look again on its own.
    claim_returns(&mut h, vec![event(1, "A")]).await;
    next(&mut h.publishes, "hand-over").await.answer(|_| Ok(()));
    none_for(&mut h.claims, Duration::from_secs(3600), "claim").await;
    assert!(h.stops.try_recv().is_err(), "stopped waiting for one row");
    // A wake-up finds a burst: inserts stop notifying while the source works.
    h.notices.send(Notice::Notify("s".into())).unwrap();
    claim_returns(&mut h, vec![event(2, "A"), event(3, "B")]).await;
    next(&mut h.stops, "stop waiting").await;
    next(&mut h.publishes, "hand-over").await.answer(|_| Ok(()));
    assert_eq!(finish(h).await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn an_insert_in_flight_makes_it_claim_again_soon_backing_off() {
    let mut h = start(limits(10, 2));
    claim_returns(&mut h, vec![]).await;
    let mut gaps = Vec::new();
    for _ in 0..6 {
        // An insert that did not notify holds the lock shared: not waiting yet.
        next(&mut h.waits, "announcement")
            .await
            .reply
            .send(Ok(false))
            .unwrap();
        let asked = Instant::now();
        claim_returns(&mut h, vec![]).await;
        gaps.push(asked.elapsed());
    }
    let want: Vec<Duration> = (0..6u32)
        .map(|fails| (REPOLL * 2u32.pow(fails)).min(REPOLL_MAX))
        .collect();
    assert_eq!(gaps, want, "claims again soon, backing off");
    assert_eq!(gaps[5], REPOLL_MAX);
    assert_eq!(finish(h).await, Ended::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_short_claim_with_rows_claims_again_without_a_notification() {
    let mut h = start(limits(10, 2));
    claim_returns(&mut h, vec![event(1, "A")]).await;
    next(&mut h.publishes, "hand-over").await.answer(|_| Ok(()));
    let asked = Instant::now();
    // Rows keep coming while the source works, and inserts do not notify then.
    claim_returns(&mut h, vec![]).await;
    assert!(asked.elapsed() <= REPOLL, "{:?}", asked.elapsed());
    assert!(h.waits.try_recv().is_err());
    next(&mut h.waits, "announcement").await;
    assert_eq!(finish(h).await, Ended::Cancelled);
}
