//! What the relay costs the services' PostgreSQL: connections bounded by databases, not
//! by sources; followers that ask for locks over the connection they already hold; one
//! coordination connection per database holding every lock this relay leads there.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{audit, connect, eventually, Metrics, Scenario, TestRelay, DEADLINE};

/// Sources led by `r`.
fn led(r: &TestRelay, names: &[String]) -> usize {
    names
        .iter()
        .filter(|n| r.running().state(n).unwrap().leader.load(Ordering::Relaxed))
        .count()
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twelve_sources_two_replicas_hold_connections_per_database_and_followers_open_no_sessions()
{
    let mut b = Scenario::builder().set("pool_size", 2).partitions(1);
    for i in 0..12 {
        b = b.source(&format!("cost{i}"));
    }
    let sc = b.migrated().await;
    let names: Vec<String> = sc.sources.iter().map(|s| s.name.clone()).collect();
    let observer = connect(&sc.pg.url("postgres")).await;
    let mut a = sc.start_relay().await;
    let mut b = sc.start_relay().await;
    eventually("every source led, once", DEADLINE, async || {
        led(&a, &names) + led(&b, &names) == names.len()
    })
    .await;
    for src in &sc.sources {
        sc.insert_events(src, 20, 3, 0);
    }
    for src in &sc.sources {
        let got = sc.consume(&src.topic, 20).await;
        assert_eq!(audit(&got), (20, 0, 0), "{}", src.name);
        sc.wait_outbox_empty(src).await;
    }
    // Two replicas, one database: each at most one coordination connection + pool_size.
    let relay_connections = count(
        &observer,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-relay'",
    )
    .await;
    assert!(
        (2..=2 * (1 + 2)).contains(&relay_connections),
        "{relay_connections} relay connections for 12 sources"
    );
    // Every lock a replica holds is on its one coordination connection.
    let lock_holders = count(
        &observer,
        "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND granted",
    )
    .await;
    assert!(
        lock_holders <= 2,
        "{lock_holders} sessions hold the sources' locks"
    );
    // While idle, with a follower asking for every lock it lacks each second, no
    // session is opened (pg_stat_database.sessions counts client sessions only).
    let sessions = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()";
    let before = count(&observer, sessions).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = count(&observer, sessions).await;
    assert_eq!(after - before, 0, "sessions opened while idle");
    // What a replica says it holds: its pool, and the replicas it shares with.
    let (_, text) = a
        .until("/metrics", DEADLINE, |_, b| {
            Metrics::parse(b).value("outbox_replicas", &[]) == Some(2.0)
        })
        .await;
    let m = Metrics::parse(&text);
    let open = m.value("outbox_pool_connections", &[("state", "open")]);
    assert!(open.is_some_and(|n| (1.0..=2.0).contains(&n)), "{open:?}");
    assert_eq!(
        m.value("outbox_pool_connections", &[("state", "waiting")]),
        Some(0.0)
    );
    assert_eq!(led(&a, &names) + led(&b, &names), names.len());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_coordination_connection_ends_every_lead_over_it_and_they_are_taken_again() {
    let (sc, mut relay) = Scenario::builder()
        .source("coord_a")
        .source("coord_b")
        .source("coord_c")
        .start()
        .await;
    let names: Vec<String> = sc.sources.iter().map(|s| s.name.clone()).collect();
    let observer = connect(&sc.pg.url("postgres")).await;
    eventually("all three led", DEADLINE, async || led(&relay, &names) == 3).await;
    let holders =
        "SELECT array_agg(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND granted";
    let first: Vec<i32> = observer.query_one(holders, &[]).await.unwrap().get(0);
    assert_eq!(
        first.len(),
        1,
        "one connection holds all three locks: {first:?}"
    );
    let killed: bool = observer
        .query_one("SELECT pg_terminate_backend($1)", &[&first[0]])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    eventually(
        "the three taken again on a new connection",
        DEADLINE,
        async || {
            let now: Option<Vec<i32>> = observer.query_one(holders, &[]).await.unwrap().get(0);
            led(&relay, &names) == 3 && now.is_some_and(|p| p.len() == 1 && p[0] != first[0])
        },
    )
    .await;
    for src in &sc.sources {
        sc.insert_events(src, 10, 2, 0);
    }
    for src in &sc.sources {
        let got = sc.consume(&src.topic, 10).await;
        assert_eq!(audit(&got), (10, 0, 0), "{}", src.name);
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_the_sources_hand_them_over_and_lose_no_event_doing_it() {
    let mut b = Scenario::builder();
    for i in 0..10 {
        b = b.source(&format!("share{i}"));
    }
    let sc = b.migrated().await;
    let names: Vec<String> = sc.sources.iter().map(|s| s.name.clone()).collect();
    let mut written = 0;
    let mut write = |round: usize| {
        for src in &sc.sources {
            sc.insert_events(src, 12, 3, round * 4);
        }
        written += 12;
    };
    let mut a = sc.start_relay().await;
    let b = sc.start_relay().await;
    write(0);
    eventually("two replicas split 10 sources 5/5", DEADLINE, async || {
        (led(&a, &names), led(&b, &names)) == (5, 5)
    })
    .await;
    write(1);
    // One leaves: the other takes everything.
    a.stop().await;
    write(2);
    eventually(
        "the survivor leads all 10 within 10s",
        Duration::from_secs(10),
        async || led(&b, &names) == 10,
    )
    .await;
    // It comes back: it gets its share by handover within 30s.
    let handovers = |r: &TestRelay| -> u64 {
        names
            .iter()
            .map(|n| r.running().metrics.handovers.with_label_values(&[n]).get())
            .sum()
    };
    let handed_before = handovers(&b);
    let a = sc.start_relay().await;
    write(3);
    eventually(
        "the returning replica gets its share",
        Duration::from_secs(30),
        async || led(&a, &names) == 5 && led(&b, &names) == 5,
    )
    .await;
    assert_eq!(
        handovers(&b) - handed_before,
        5,
        "five sources handed over to the returning replica"
    );
    // A third: shares of ceil(10 / 3) = 4 at most.
    let c = sc.start_relay().await;
    write(4);
    eventually(
        "three replicas, at most 4 each, all led",
        DEADLINE,
        async || {
            let (x, y, z) = (led(&a, &names), led(&b, &names), led(&c, &names));
            x <= 4 && y <= 4 && z <= 4 && x + y + z == 10 && z >= 2
        },
    )
    .await;
    write(5);
    for src in &sc.sources {
        let got = sc.consume(&src.topic, written).await;
        let (distinct, _dups, disorder) = audit(&got);
        assert_eq!(distinct, written, "{}: nothing lost", src.name);
        assert_eq!(disorder, 0, "{}: per-aggregate order kept", src.name);
        sc.wait_outbox_empty(src).await;
    }
    let mut all = [a, b, c];
    for r in &mut all {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_below_its_share_asks_for_no_lock_that_another_holds() {
    // 10 sources, 3 replicas, shares of 4: one replica leads fewer than its share, and
    // it must not ask PostgreSQL for the 8 held locks every second.
    let mut b = Scenario::builder()
        .set("process_interval", "1h")
        .set("health.refresh_interval", "1h");
    for i in 0..10 {
        b = b.source(&format!("quiet{i}"));
    }
    let sc = b.migrated().await;
    let names: Vec<String> = sc.sources.iter().map(|s| s.name.clone()).collect();
    let relays = [
        sc.start_relay().await,
        sc.start_relay().await,
        sc.start_relay().await,
    ];
    eventually(
        "10 sources led in shares of at most 4",
        DEADLINE,
        async || {
            let led: Vec<usize> = relays.iter().map(|r| led(r, &names)).collect();
            led.iter().sum::<usize>() == 10 && led.iter().all(|n| *n <= 4)
        },
    )
    .await;
    // Every statement the server runs in 4 s of idle, from its own log.
    sc.pg.log_statements();
    let mark = sc.pg.log_mark();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = sc.pg.log_since(mark);
    let statements = log
        .lines()
        .filter(|l| l.contains("LOG:  statement: ") || l.contains("LOG:  execute "))
        .count();
    // Each replica counts the members once a second (3/s); a follower asking for each
    // held lock would add 8/s.
    let per_s = statements as f64 / 4.0;
    assert!(per_s <= 3.75, "{per_s} statements/s while idle:\n{log}");
    for mut r in relays {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relays_configured_with_other_sources_do_not_shrink_each_others_share() {
    // Two relay deployments on one database, each with its own sources: each is a
    // group of one and leads all of its sources, not half.
    let mut b = Scenario::builder();
    for i in 0..6 {
        b = b.source(&format!("team{i}"));
    }
    let sc = b.migrated().await;
    let names: Vec<String> = sc.sources.iter().map(|s| s.name.clone()).collect();
    let mut first = sc.config.clone();
    let mut second = sc.config.clone();
    for (i, n) in names.iter().enumerate() {
        if i < 3 {
            second = second.source_remove(n);
        } else {
            first = first.source_remove(n);
        }
    }
    let mut a = TestRelay::start(first.settings()).await;
    let mut b = TestRelay::start(second.settings()).await;
    eventually("each leads its own three", DEADLINE, async || {
        led(&a, &names[..3]) == 3 && led(&b, &names[3..]) == 3
    })
    .await;
    let (_, text) = a.get("/metrics").await;
    assert_eq!(
        Metrics::parse(&text).value("outbox_replicas", &[]),
        Some(1.0),
        "the other deployment is not one of its replicas"
    );
    for src in &sc.sources {
        sc.insert_events(src, 10, 2, 0);
    }
    for src in &sc.sources {
        assert_eq!(
            audit(&sc.consume(&src.topic, 10).await),
            (10, 0, 0),
            "{}",
            src.name
        );
    }
    a.stop().await;
    b.stop().await;
}
