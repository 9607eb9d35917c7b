//! A broker that goes away: librdkafka's mock cluster takes its broker down.
//!
//! These tests run one at a time in their own test binary: taking a mock broker down
//! closes and re-binds its listening port, and a port grabbed in between by a parallel
//! test's socket would abort the process.

mod common;

use std::time::{Duration, Instant};

use common::{audit, Metrics, Scenario, DEADLINE};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_of_30s_loses_nothing_and_dead_letters_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (sc, mut relay) = Scenario::builder()
        .source("outage")
        .partitions(3)
        .set("batch_size", 50)
        .set("max_retries", 1)
        .start()
        .await;
    let (pg, src, kafka) = (&sc.pg, sc.src(), sc.kafka.mock());
    sc.insert_events(src, 100, 7, 0);
    let first = sc.consume(&src.topic, 100).await;
    assert_eq!(audit(&first), (100, 0, 0));

    kafka.broker_down(1).expect("broker down");
    let down_at = Instant::now();
    sc.insert_events(src, 500, 7, 100);
    // Hold the outage for 30s: nothing may leave the outbox, burn a retry or be dead-lettered.
    let state = relay.running().state(&src.name).unwrap().clone();
    while down_at.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(sc.outbox_rows(src), 500);
        assert_eq!(sc.dead_letter_rows(src), 0);
    }
    let burnt = pg.psql(
        "postgres",
        &format!(
            "SELECT count(*) FROM {}.outbox WHERE retry_count > 0 OR next_attempt_at IS NOT NULL",
            src.schema
        ),
    );
    assert_eq!(
        burnt, "0",
        "a transport outage must not burn the events' retries"
    );
    assert!(
        state.last_error.lock().unwrap().is_some(),
        "the outage is visible"
    );
    let (code, body) = relay.get("/health").await;
    assert_eq!(code, 200, "liveness does not depend on Kafka: {body}");

    kafka.broker_up(1).expect("broker up");
    let up_at = Instant::now();
    sc.wait_outbox_empty(src).await;
    let resumed_in = up_at.elapsed();
    let all = sc.consume(&src.topic, 600).await;
    relay.stop().await;
    let (distinct, dups, disorder) = audit(&all);
    eprintln!("outage 30s: relayed {distinct}/600, duplicated {dups}, out of order {disorder}, drained {resumed_in:?} after the broker's return");
    assert_eq!(distinct, 600, "nothing lost");
    assert_eq!(disorder, 0);
    assert_eq!(sc.dead_letter_rows(src), 0);
    assert!(
        resumed_in < Duration::from_secs(15),
        "resumed {resumed_in:?} after the broker returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_back_events_grow_the_lag_gauge_and_degrade_the_lag_check() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (sc, mut relay) = Scenario::builder()
        .source("lag")
        .partitions(2)
        .set("health.lag_threshold", "2s")
        .start()
        .await;
    let (src, kafka) = (sc.src(), sc.kafka.mock());
    kafka.broker_down(1).unwrap();
    sc.insert_events(src, 10, 2, 0);
    let gauge = |text: &str, name: &str| Metrics::parse(text).of_source(name, &src.name);
    let age = |text: &str| gauge(text, "outbox_oldest_pending_age_seconds");
    let (_, t1) = relay.until("/metrics", DEADLINE, |_, b| age(b) > 0.5).await;
    let t1_at = Instant::now();
    let (_, t2) = relay
        .until("/metrics", DEADLINE, |_, b| age(b) > age(&t1) + 1.0)
        .await;
    let between = t1_at.elapsed().as_secs_f64();
    // While the ten events are held the age grows with the clock, in seconds, not faster.
    assert!(
        age(&t2) - age(&t1) <= between + 1.0,
        "the oldest-pending age grew {}s in {between}s",
        age(&t2) - age(&t1)
    );
    assert_eq!(gauge(&t2, "outbox_events_pending"), 10.0);
    assert_eq!(sc.outbox_rows(src), 10, "held, not lost");
    let (code, body) = relay
        .until("/health/deep", DEADLINE, |_, b| b.contains("\"degraded\""))
        .await;
    assert_eq!(code, 503);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let lag = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["component"] == format!("lag:{}", src.name))
        .unwrap()
        .clone();
    assert_eq!(lag["status"], "degraded", "{v}");
    assert_eq!(lag["details"]["events_pending"], 10);
    kafka.broker_up(1).unwrap();
    sc.wait_outbox_empty(src).await;
    relay.until("/health/deep", DEADLINE, |c, _| c == 200).await;
    relay.stop().await;
}
