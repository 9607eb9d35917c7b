//! Real faults under the in-process relay: a broker that goes away, request errors
//! injected by librdkafka's mock cluster, poison events, a PostgreSQL restart, an
//! unreachable database, a full dead-letter table, a panicking task.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::broker::produce_one;
use common::{audit, eventually, header, Metrics, Scenario, TestRelay, DEADLINE};
use outbox_relay::dead_letter::{self, Filter};
use rdkafka::types::{RDKafkaApiKey, RDKafkaErrorCode, RDKafkaRespErr};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_produce_errors_are_retried_by_the_producer_without_losing_order() {
    let sc = Scenario::builder()
        .source("flaky")
        .partitions(2)
        .set("batch_size", 40)
        .migrated()
        .await;
    let src = sc.src();
    // A topic of the test's own, so that its probes never reach the relay's consumers.
    let probe = format!("{}.probe", src.schema);
    sc.kafka.create_topic(&probe, 1);
    // The mock cluster answers the next produce requests, whoever sends them, with these
    // errors, in this order: the first is the probe's, the other four the relay's. The
    // probe never retries, except on leader errors (librdkafka always does): the last
    // error is not one, so a probe succeeds only once none of them is left.
    sc.kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    assert_eq!(
        produce_one(&sc.bootstrap(), &probe).await,
        Err(RDKafkaErrorCode::NotEnoughReplicas),
        "the injected errors are waiting for produce requests"
    );
    sc.insert_events(src, 400, 11, 0);
    let mut relay = sc.start_relay().await;
    let got = sc.consume(&src.topic, 400).await;
    sc.wait_outbox_empty(src).await;
    let (_, text) = relay.get("/metrics").await;
    relay.stop().await;
    assert_eq!(audit(&got), (400, 0, 0));
    assert_eq!(sc.dead_letter_rows(src), 0);
    assert_eq!(
        produce_one(&sc.bootstrap(), &probe).await,
        Ok(()),
        "the relay's produce requests were answered with all four injected errors"
    );
    let m = Metrics::parse(&text);
    assert_eq!(
        m.value(
            "outbox_events_failed_total",
            &[("source", &src.name), ("reason", "transport")]
        ),
        Some(0.0),
        "the producer retried them; no batch failed for the relay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_event_retries_with_backoff_while_its_aggregate_waits_and_others_flow() {
    // One partition: the consumer sees the order in which Kafka acknowledged.
    let (sc, mut relay) = Scenario::builder()
        .source("retry")
        .set("max_retries", 5)
        .set("retry.backoff_base", "2s")
        .set("retry.backoff_max", "4s")
        .start()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    // Let the relay connect first, so the injected error hits our event's produce request.
    sc.insert_events(src, 1, 1, 0);
    let warm = sc.consume(&src.topic, 1).await;
    assert_eq!(warm.len(), 1);
    sc.kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_POLICY_VIOLATION],
    );
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {s}.outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'A', 'E', '{{\"seq\": 1}}');",
            s = src.schema
        ),
    );
    let schema = src.schema.clone();
    let retry_count = || {
        pg.psql("postgres", &format!("SELECT coalesce(max(retry_count), 0) FROM {schema}.outbox WHERE aggregate_id = 'A'"))
    };
    eventually(
        "the failed event is scheduled for a retry",
        DEADLINE,
        async || retry_count() == "1",
    )
    .await;
    let last_error = pg.psql(
        "postgres",
        &format!("SELECT last_error FROM {schema}.outbox WHERE aggregate_id = 'A'"),
    );
    assert!(
        last_error.contains("PolicyViolation") || last_error.to_lowercase().contains("policy"),
        "{last_error}"
    );
    // While A waits, A's later event waits behind it and B flows.
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'A', 'E', '{{\"seq\": 2}}'), ('order', 'B', 'E', '{{\"seq\": 1}}');"
        ),
    );
    let got = sc.consume(&src.topic, 4).await;
    sc.wait_outbox_empty(src).await;
    relay.stop().await;
    let order: Vec<(String, String)> = got
        .iter()
        .filter(|r| r.key.as_deref() != Some("agg-0"))
        .map(|r| (r.key.clone().unwrap(), r.value.clone().unwrap()))
        .collect();
    let pos = |k: &str, seq: i32| {
        order
            .iter()
            .position(|(key, v)| key == k && v.contains(&format!("\"seq\": {seq}")))
            .unwrap_or_else(|| panic!("{k}/{seq} missing from {order:?}"))
    };
    assert!(
        pos("B", 1) < pos("A", 1),
        "B flowed while A waited: {order:?}"
    );
    assert!(
        pos("A", 1) < pos("A", 2),
        "A's events kept their order: {order:?}"
    );
    assert_eq!(audit(&got).1, 0);
    assert_eq!(sc.dead_letter_rows(src), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_events_are_dead_lettered_at_once_others_flow_and_replay_sends_them_back() {
    let sc = Scenario::builder()
        .source("poison")
        .partitions(3)
        .set("batch_size", 25)
        .migrated()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    let schema = &src.schema;
    sc.insert_events(src, 50, 5, 0);
    // Too large for the producer's message.max.bytes (1 MB by default), an invalid topic,
    // and headers that are not an object of strings.
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) \
               SELECT 'doc', 'big', 'DocumentStored', jsonb_build_object('blob', repeat('x', 1500000));
             INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
               VALUES ('doc', 'bad-topic', 'Moved', '{{}}', 'no spaces allowed');
             INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
               VALUES ('doc', 'bad-headers', 'Tagged', '{{}}', '[1, 2]');"
        ),
    );
    sc.insert_events(src, 50, 5, 10);
    let mut relay = sc.start_relay().await;
    let got = sc.consume(&src.topic, 100).await;
    sc.wait_outbox_empty(src).await;
    assert_eq!(audit(&got), (100, 0, 0), "the other aggregates flowed");
    let errors = pg.psql(
        "postgres",
        &format!("SELECT aggregate_id || ' ' || retry_count || ' ' || error FROM {schema}.outbox_dead_letter ORDER BY id"),
    );
    let lines: Vec<&str> = errors.lines().collect();
    assert_eq!(lines.len(), 3, "{errors}");
    assert!(lines[0].starts_with("big 0 message_too_large"), "{errors}");
    assert!(
        lines[1].starts_with("bad-topic 0 invalid_topic") && lines[1].contains("no spaces allowed"),
        "{errors}"
    );
    assert!(
        lines[2].starts_with("bad-headers 0 invalid_record") && lines[2].contains("JSON object"),
        "{errors}"
    );
    let dead = relay
        .running()
        .metrics
        .dead_lettered
        .with_label_values(&[&src.name])
        .get();
    assert_eq!(dead, 3);
    relay.stop().await;

    // Fix the cause (allow larger messages), then replay the big one by id.
    let fixed = sc
        .config
        .clone()
        .kafka_property("message.max.bytes", "4000000")
        .settings();
    let source = fixed.sources[0].clone();
    let big = dead_letter::list(
        &source,
        &Filter {
            event_type: Some("DocumentStored".into()),
            ..Filter::default()
        },
        10,
        true,
        DEADLINE,
    )
    .await
    .unwrap();
    assert_eq!(big.len(), 1);
    let event_id = big[0].event_id.clone();
    let replayed = dead_letter::replay(
        &source,
        &Filter {
            ids: vec![big[0].id],
            ..Filter::default()
        },
        DEADLINE,
    )
    .await
    .unwrap();
    assert_eq!(replayed, vec![big[0].id]);
    assert_eq!(sc.dead_letter_rows(src), 2);
    let mut relay = TestRelay::start(fixed).await;
    let got = sc.consume(&src.topic, 101).await;
    sc.wait_outbox_empty(src).await;
    relay.stop().await;
    let big = got
        .iter()
        .find(|r| r.key.as_deref() == Some("big"))
        .expect("the replayed event arrived");
    assert_eq!(
        header(big, "event_id"),
        Some(event_id.as_str()),
        "replay keeps event_id"
    );
    assert!(big.value.as_ref().unwrap().len() > 1_500_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_dead_letter_table_keeps_failing_events_in_the_outbox_and_says_so() {
    let sc = Scenario::builder()
        .source("full")
        .set("dead_letter_size", 2)
        .migrated()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    let schema = &src.schema;
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
             SELECT 'doc', 'p' || i, 'Moved', '{{}}', 'bad topic' FROM generate_series(1, 5) i;"
        ),
    );
    sc.insert_events(src, 20, 4, 0);
    let mut relay = sc.start_relay().await;
    let got = sc.consume(&src.topic, 20).await;
    assert_eq!(audit(&got), (20, 0, 0));
    let parked = || {
        pg.psql(
            "postgres",
            &format!("SELECT count(*) FROM {schema}.outbox WHERE status = 'dead_letter_full'"),
        )
    };
    eventually("three events parked in the outbox", DEADLINE, async || {
        parked() == "3"
    })
    .await;
    assert_eq!(sc.dead_letter_rows(src), 2, "nothing deleted to make room");
    let last = pg.psql(
        "postgres",
        &format!("SELECT last_error FROM {schema}.outbox LIMIT 1"),
    );
    assert!(last.contains("dead-letter table full"), "{last}");
    eventually(
        "the dead-letter gauge sees the fill",
        DEADLINE,
        async || {
            relay
                .running()
                .state(&src.name)
                .unwrap()
                .dead_letter_rows
                .load(Ordering::Relaxed)
                == 2
        },
    )
    .await;
    let (code, body) = relay.get("/health/deep").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("full, failing events stay in the outbox"),
        "{body}"
    );
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_dead_letter_block_holds_the_aggregate_until_replay() {
    let sc = Scenario::builder()
        .source("block")
        .set("retry.after_dead_letter", "block")
        .migrated()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    let s = sc.settings();
    let schema = &src.schema;
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, headers) VALUES ('o', 'A', 'E', '{{\"seq\": 1}}', '\"bad\"');
             INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('o', 'A', 'E', '{{\"seq\": 2}}'), ('o', 'B', 'E', '{{\"seq\": 1}}');"
        ),
    );
    let mut relay = TestRelay::start(s.clone()).await;
    let got = sc.consume(&src.topic, 1).await;
    assert_eq!(got.len(), 1, "only B flows: {got:?}");
    assert_eq!(got[0].key.as_deref(), Some("B"));
    assert_eq!(
        sc.outbox_rows(src),
        1,
        "A/2 waits behind the dead-lettered A/1"
    );
    // Fix the row's headers is the service's job; here the operator purges nothing and
    // replays after the fix: simulate the fix on the dead-letter row, then replay all.
    pg.psql(
        "postgres",
        &format!("UPDATE {schema}.outbox_dead_letter SET headers = NULL"),
    );
    let replayed = dead_letter::replay(
        &s.sources[0],
        &Filter {
            all: true,
            ..Filter::default()
        },
        DEADLINE,
    )
    .await
    .unwrap();
    assert_eq!(replayed.len(), 1);
    let got = sc.consume(&src.topic, 3).await;
    sc.wait_outbox_empty(src).await;
    relay.stop().await;
    let a: Vec<&str> = got
        .iter()
        .filter(|r| r.key.as_deref() == Some("A"))
        .map(|r| r.value.as_deref().unwrap())
        .collect();
    assert_eq!(
        a,
        ["{\"seq\": 1}", "{\"seq\": 2}"],
        "A's order survives the dead letter"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_restarted_under_the_relay_loses_nothing() {
    let sc = Scenario::builder()
        .source("pgrestart")
        .partitions(3)
        .set("batch_size", 20)
        .migrated()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    sc.insert_events(src, 5000, 31, 0);
    let mut relay = sc.start_relay().await;
    eventually("mid-stream", DEADLINE, async || sc.outbox_rows(src) < 4500).await;
    pg.kill(); // crash-like: the relay's connections die mid-batch
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.restart();
    sc.insert_events(src, 1000, 31, 1000);
    sc.wait_outbox_empty(src).await;
    let got = sc.consume(&src.topic, 6000).await;
    let errors = relay
        .running()
        .metrics
        .poll_errors
        .with_label_values(&[&src.name])
        .get();
    relay.stop().await;
    let (distinct, dups, disorder) = audit(&got);
    eprintln!("postgres restart: relayed {distinct}/6000, duplicated {dups}, out of order {disorder}, poll errors {errors}");
    assert_eq!(distinct, 6000, "nothing lost");
    assert_eq!(disorder, 0);
    assert_eq!(sc.dead_letter_rows(src), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_database_does_not_hold_back_other_sources() {
    let sc = Scenario::builder()
        .source("good")
        .unreachable_source("bad")
        .migrated()
        .await;
    let (good, bad) = (&sc.sources[0], &sc.sources[1]);
    sc.insert_events(good, 100, 3, 0);
    let mut relay = sc.start_relay().await;
    let got = sc.consume(&good.topic, 100).await;
    assert_eq!(audit(&got), (100, 0, 0));
    let m = &relay.running().metrics;
    eventually("the bad source is reported down", DEADLINE, async || {
        m.source_up.with_label_values(&[&bad.name]).get() == 0
            && m.source_up.with_label_values(&[&good.name]).get() == 1
    })
    .await;
    let (code, body) = relay.get("/health/deep").await;
    assert_eq!(code, 503, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let check = common::http::database_check(&v, &bad.name);
    assert_eq!(check["status"], "down", "{body}");
    let (code, _) = relay.get("/health").await;
    assert_eq!(code, 200, "liveness does not depend on the database");
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_source_task_is_restarted_and_goes_on() {
    let (sc, mut relay) = Scenario::builder().source("panicky").start().await;
    let src = sc.src();
    let state = relay.running().state(&src.name).unwrap().clone();
    eventually("leader", DEADLINE, async || {
        state.leader.load(Ordering::Relaxed)
    })
    .await;
    let hooks = relay.running().hooks(&src.name).unwrap().clone();
    hooks.panic_once.store(true, Ordering::Relaxed);
    // An idle source claims nothing until a row wakes it: the claim panics.
    sc.insert_events(src, 30, 3, 0);
    let restarts = relay
        .running()
        .metrics
        .task_restarts
        .with_label_values(&[&src.name]);
    eventually("the task restarted", DEADLINE, async || restarts.get() == 1).await;
    assert!(state
        .last_error
        .lock()
        .unwrap()
        .as_deref()
        .unwrap_or("")
        .contains("panicked"));
    let got = sc.consume(&src.topic, 30).await;
    assert_eq!(audit(&got), (30, 0, 0));
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_configured_max_retries_applies_to_rows_that_name_none() {
    let (sc, mut relay) = Scenario::builder()
        .source("giveup")
        .set("max_retries", 0)
        .start()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    sc.insert_events(src, 1, 1, 0);
    assert_eq!(sc.consume(&src.topic, 1).await.len(), 1);
    sc.kafka.mock().request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_POLICY_VIOLATION],
    );
    sc.insert_events(src, 1, 1, 5);
    let schema = &src.schema;
    eventually("dead-lettered after one attempt", DEADLINE, async || {
        sc.dead_letter_rows(src) == 1
    })
    .await;
    let error = pg.psql(
        "postgres",
        &format!("SELECT error FROM {schema}.outbox_dead_letter"),
    );
    assert!(error.contains("gave up after 1 attempts"), "{error}");
    relay.stop().await;
}
