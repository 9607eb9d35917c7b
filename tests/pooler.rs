//! Behind PgBouncer: the coordination connection needs a session of its own (session
//! advisory locks, LISTEN), which a transaction-mode pooler does not keep; the relay
//! refuses it, with a message that says what to do. Through a session-mode pooler both
//! the pool and the coordination connection work.

mod common;

use common::pgbouncer::PgBouncer;
use common::{audit, connect, eventually, Scenario, TestRelay, DEADLINE};

/// Source locks (the relay's advisory-lock class) granted on the server.
async fn source_locks(pg_url: &str) -> i64 {
    let c = connect(pg_url).await;
    c.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND classid = $1::int4::oid AND objsubid = 2",
        &[&outbox_relay::migrate::LOCK_CLASS],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordination_connection_through_a_transaction_pooler_is_refused() {
    let sc = Scenario::builder().source("txpooled").migrated().await;
    let src = sc.src();
    let bouncer = PgBouncer::start(&sc.pg, "transaction");
    let mut relay = TestRelay::start(
        sc.config
            .clone()
            .source_set(&src.name, "coordination_url", bouncer.url(&src.db))
            .settings(),
    )
    .await;
    sc.insert_events(src, 5, 1, 0);
    let (_, body) = relay
        .until("/health/deep", DEADLINE, |code, body| {
            code == 503 && body.contains("does not keep its session")
        })
        .await;
    assert!(body.contains("session mode"), "says what to do: {body}");
    let state = relay.running().state(&src.name).unwrap();
    assert!(!state.is_leader(), "leads over a pooled connection");
    assert!(
        state
            .last_error
            .lock()
            .unwrap()
            .as_deref()
            .is_some_and(|e| e.contains("coordination_url")),
        "the source says why it is not led"
    );
    assert_eq!(sc.outbox_rows(src), 5, "nothing published");
    // Nobody leads the source, so this replica shows its backlog.
    relay
        .until("/metrics", DEADLINE, |_, b| {
            common::Metrics::parse(b).value("outbox_events_pending", &[("source", &src.name)])
                == Some(5.0)
        })
        .await;
    assert_eq!(source_locks(&sc.pg.url("postgres")).await, 0);
    relay.stop().await;
    drop(bouncer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_through_a_session_pooler_lead_once_and_deliver_in_order() {
    let sc = Scenario::builder().source("sesspooled").migrated().await;
    let src = sc.src();
    let bouncer = PgBouncer::start(&sc.pg, "session");
    let config = sc
        .config
        .clone()
        .source_set(&src.name, "database_url", bouncer.url(&src.db))
        .source_set(&src.name, "coordination_url", bouncer.url(&src.db));
    let mut a = TestRelay::start(config.settings()).await;
    let mut b = TestRelay::start(config.settings()).await;
    let leaders = || {
        [&a, &b]
            .iter()
            .filter(|r| r.running().state(&src.name).unwrap().is_leader())
            .count()
    };
    eventually("one leader", DEADLINE, async || leaders() == 1).await;
    sc.insert_events(src, 60, 4, 0);
    let got = sc.consume(&src.topic, 60).await;
    assert_eq!(audit(&got), (60, 0, 0), "{}", bouncer.log_tail(20));
    assert_eq!(leaders(), 1);
    assert_eq!(source_locks(&sc.pg.url("postgres")).await, 1);
    a.stop().await;
    b.stop().await;
}
