//! The relay in-process against a real PostgreSQL and librdkafka's mock cluster:
//! what consumers receive, in what order, and what is left in the outbox.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{audit, consume_async, eventually, header, Scenario, TestRelay, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn committed_events_arrive_exactly_as_written_and_rolled_back_ones_never() {
    let sc = Scenario::builder()
        .source("contract")
        .partitions(3)
        .migrated()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    let other_topic = format!("{}.override", src.schema);
    sc.kafka.create_topic(&other_topic, 3);
    let schema = &src.schema;
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, headers, correlation_id, idempotency_token) \
               VALUES ('customer', 'c-1', 'CustomerCreated', '{{\"name\": \"Ada\", \"n\": 1}}', '{{\"traceparent\": \"00-1\"}}', 'corr-1', 'tok-1');
             INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) \
               VALUES ('customer', 'c-1', 'CustomerDeleted', NULL);
             INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
               VALUES ('customer', 'c-2', 'CustomerCreated', '{{}}', '{other_topic}');
             BEGIN;
             INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) \
               VALUES ('customer', 'c-3', 'CustomerCreated', '{{\"rolled\": \"back\"}}');
             ROLLBACK;"
        ),
    );
    let dup = std::process::Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-c"])
        .arg(format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, idempotency_token) VALUES ('customer', 'c-9', 'X', 'tok-1')"
        ))
        .output()
        .expect("psql");
    assert!(
        !dup.status.success() && String::from_utf8_lossy(&dup.stderr).contains("duplicate key"),
        "a duplicate idempotency_token must fail the service's insert"
    );
    let event_ids = pg.psql(
        "postgres",
        &format!("SELECT event_id FROM {schema}.outbox ORDER BY id"),
    );
    let event_ids: Vec<&str> = event_ids.lines().collect();

    let mut relay = sc.start_relay().await;
    let main = sc.consume(&src.topic, 2).await;
    let over = sc.consume(&other_topic, 1).await;
    sc.wait_outbox_empty(src).await;
    relay.stop().await;

    assert_eq!(
        main.len(),
        2,
        "exactly the committed events on the source topic: {main:?}"
    );
    let (a, b) = (&main[0], &main[1]);
    assert_eq!(a.key.as_deref(), Some("c-1"));
    let v: serde_json::Value = serde_json::from_str(a.value.as_deref().unwrap()).unwrap();
    assert_eq!(v, serde_json::json!({"name": "Ada", "n": 1}));
    assert_eq!(header(a, "event_id"), Some(event_ids[0]));
    assert_eq!(header(a, "event_type"), Some("CustomerCreated"));
    assert_eq!(header(a, "aggregate_type"), Some("customer"));
    assert_eq!(header(a, "source"), Some(src.name.as_str()));
    assert_eq!(header(a, "correlation_id"), Some("corr-1"));
    assert_eq!(header(a, "idempotency_token"), Some("tok-1"));
    assert_eq!(header(a, "traceparent"), Some("00-1"));
    assert_eq!(b.key.as_deref(), Some("c-1"));
    assert_eq!(b.value, None, "a NULL payload is a tombstone");
    assert_eq!(header(b, "event_type"), Some("CustomerDeleted"));
    assert_eq!(header(b, "correlation_id"), None);
    assert_eq!(a.partition, b.partition, "one key, one partition");
    assert!(a.offset < b.offset);
    assert_eq!(
        over.len(),
        1,
        "the row's topic overrides the source's: {over:?}"
    );
    assert_eq!(over[0].key.as_deref(), Some("c-2"));
    assert_eq!(sc.outbox_rows(src), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_aggregate_order_holds_under_concurrent_writers() {
    // Small batches: order must hold across many of them.
    let (sc, mut relay) = Scenario::builder()
        .source("order")
        .partitions(4)
        .set("batch_size", 7)
        .start()
        .await;
    let src = sc.src();

    let writers = 4;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = src.url.clone();
        let schema = src.schema.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = common::connect(&url).await;
            let mut seq = [0i64; 5];
            let mut committed = 0usize;
            for txn in 0..60 {
                let tx = client.transaction().await.expect("begin");
                let mut next = seq;
                for k in 0..(1 + txn % 6) {
                    let agg = (txn + k) % 5;
                    tx.execute(
                        &format!("INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'OrderChanged', jsonb_build_object('seq', $2::bigint))"),
                        &[&format!("w{w}-a{agg}"), &next[agg]],
                    )
                    .await
                    .expect("insert");
                    next[agg] += 1;
                }
                if txn % 5 == 4 {
                    tx.rollback().await.expect("rollback");
                } else {
                    tx.commit().await.expect("commit");
                    committed += next.iter().zip(&seq).map(|(a, b)| (a - b) as usize).sum::<usize>();
                    seq = next;
                }
            }
            committed
        }));
    }
    let mut expected = 0;
    for t in tasks {
        expected += t.await.expect("writer");
    }
    let got = sc.consume(&src.topic, expected).await;
    sc.wait_outbox_empty(src).await;
    relay.stop().await;
    let (distinct, dups, disorder) = audit(&got);
    assert_eq!(distinct, expected, "every committed event arrives");
    assert_eq!(
        got.len(),
        expected,
        "no event arrives twice without a crash"
    );
    assert_eq!((dups, disorder), (0, 0));
    let values: std::collections::HashSet<_> = got.iter().map(|r| r.value.clone()).collect();
    assert!(values.iter().all(|v| v.is_some()));
}

/// Delivered rows leave the outbox while the claims run back to back: here each claim
/// walks past 100,000 rows waiting for a retry an hour away, and notifications keep
/// asking for the next one. A delete waits for a running claim only within a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivered_rows_are_deleted_while_slow_claims_run_back_to_back() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let sc = Scenario::builder().source("busy").migrated().await;
    let (pg, src) = (&sc.pg, sc.src());
    let schema = &src.schema;
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload, retry_count, next_attempt_at) \
             SELECT 'order', 'parked-' || i, 'OrderChanged', '{{}}', 1, now() + interval '1 hour' \
             FROM generate_series(1, 100000) AS i;
             ANALYZE {schema}.outbox"
        ),
    );
    let mut relay = sc.start_relay().await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut notifiers = Vec::new();
    for _ in 0..4 {
        let (url, schema, stop) = (src.url.clone(), src.schema.clone(), stop.clone());
        notifiers.push(tokio::spawn(async move {
            let client = common::connect(&url).await;
            let notify = format!("SELECT pg_notify('outbox_relay', '{schema}')");
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                client.batch_execute(&notify).await.expect("notify");
                sent += 1;
            }
            sent
        }));
    }
    sc.insert_events(src, 5, 5, 0);
    let got = sc.consume(&src.topic, 5).await;
    let pending = format!("SELECT count(*) FROM {schema}.outbox WHERE next_attempt_at IS NULL");
    // Within 10 ms of landing, plus the delete; seconds, usually, without the bound.
    let deadline = Duration::from_secs(3);
    let start = std::time::Instant::now();
    let mut left = String::new();
    while start.elapsed() < deadline {
        left = pg.psql("postgres", &pending);
        if left == "0" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        notifiers.iter().all(|t| !t.is_finished()),
        "the notifications kept coming until the delivered rows were gone"
    );
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for t in notifiers {
        sent += t.await.expect("notifier");
    }
    relay.stop().await;
    assert_eq!(
        left, "0",
        "delivered rows still in the outbox after {deadline:?}"
    );
    assert_eq!(audit(&got), (5, 0, 0), "{got:?}");
    assert_eq!(sc.outbox_rows(src), 100_000, "the parked rows stay");
    assert!(sent >= 100, "only {sent} notifications went out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_sources_across_two_databases() {
    let sc = Scenario::builder()
        .source("customer")
        .source("product")
        .source_in("catalog", "product_admin")
        .source_in("catalog", "product_loader")
        .partitions(2)
        .set("batch_size", 50)
        .migrated()
        .await;
    for (i, src) in sc.sources.iter().enumerate() {
        sc.insert_events(src, 300 + i * 100, 13, 0);
    }
    let mut relay = sc.start_relay().await;
    for (i, src) in sc.sources.iter().enumerate() {
        let n = 300 + i * 100;
        let got = sc.consume(&src.topic, n).await;
        let (distinct, dups, disorder) = audit(&got);
        assert_eq!((distinct, dups, disorder), (n, 0, 0), "source {}", src.name);
        assert!(got
            .iter()
            .all(|r| header(r, "source") == Some(src.name.as_str())));
    }
    assert_eq!(
        sc.sources.iter().map(|s| s.db.as_str()).collect::<Vec<_>>(),
        ["postgres", "postgres", "catalog", "catalog"]
    );
    for src in &sc.sources {
        sc.wait_outbox_empty(src).await;
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_never_work_one_source_at_once_and_a_survivor_takes_over() {
    let sc = Scenario::builder()
        .source("pair")
        .partitions(3)
        .set("batch_size", 20)
        .migrated()
        .await;
    let src = sc.src();
    let mut a = sc.start_relay().await;
    let mut b = sc.start_relay().await;
    let leads = |r: &TestRelay| {
        r.running()
            .state(&src.name)
            .unwrap()
            .leader
            .load(Ordering::Relaxed)
    };
    let leaders = |a: &TestRelay, b: &TestRelay| (leads(a), leads(b));
    eventually("somebody takes the source", DEADLINE, async || {
        leaders(&a, &b) != (false, false)
    })
    .await;
    let total = 3000;
    for round in 0..3 {
        sc.insert_events(src, 500, 17, round * 500 / 17 + round);
        assert_ne!(leaders(&a, &b), (true, true), "two leaders at once");
    }
    // Stop whoever leads mid-stream; the other must take over and finish.
    let (la, _) = leaders(&a, &b);
    if la {
        a.stop().await;
    } else {
        b.stop().await;
    }
    for round in 3..6 {
        sc.insert_events(src, 500, 17, round * 500 / 17 + round);
    }
    let survivor = if la { &b } else { &a };
    eventually("takeover within 10s", Duration::from_secs(10), async || {
        leads(survivor)
    })
    .await;
    let got = sc.consume(&src.topic, total).await;
    sc.wait_outbox_empty(src).await;
    a.stop().await;
    b.stop().await;
    let (distinct, _dups, disorder) = audit(&got);
    assert_eq!(distinct, total, "nothing lost");
    assert_eq!(disorder, 0, "per-aggregate order kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disabled_relay_publishes_nothing_and_never_blocks_an_enabled_one() {
    let sc = Scenario::builder().source("disabled").migrated().await;
    let src = sc.src();
    sc.insert_events(src, 40, 4, 0);
    let off = sc.config.clone().set("enabled", false).settings();
    assert!(!off.enabled);
    let mut disabled = TestRelay::start(off).await;
    let got = consume_async(&sc.bootstrap(), &src.topic, 1, Duration::from_secs(2)).await;
    assert!(got.is_empty(), "a disabled relay published {got:?}");
    assert_eq!(sc.outbox_rows(src), 40);
    let (code, _) = disabled.get("/health").await;
    assert_eq!(code, 200, "a disabled relay is alive");
    let mut enabled = sc.start_relay().await;
    let got = sc.consume(&src.topic, 40).await;
    assert_eq!(audit(&got), (40, 0, 0));
    let held = disabled
        .running()
        .state(&src.name)
        .unwrap()
        .leader
        .load(Ordering::Relaxed);
    assert!(!held, "the disabled relay never took the source");
    enabled.stop().await;
    disabled.stop().await;
}

/// The claim returns exactly the rows the relay does not hold, lowest ids first, in both
/// of its forms (gaps between held ids, or the held ids listed), and finds a row that
/// commits late into a gap between held ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_returns_the_rows_not_held_in_id_order_and_finds_late_commits() {
    use outbox_relay::db::DatabaseUrl;
    use outbox_relay::source::store::Store;

    let sc = Scenario::builder()
        .source("claim")
        .no_broker()
        .migrated()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    sc.insert_events(src, 400, 3, 0);
    let pool = DatabaseUrl::parse(&src.url)
        .unwrap()
        .pool(2, DEADLINE)
        .unwrap();
    let client = pool.get().await.unwrap();
    let store = Store::new(&src.schema);
    let ids: Vec<i64> = pg
        .psql(
            "postgres",
            &format!(
                "SELECT string_agg(id::text, ',' ORDER BY id) FROM {}.outbox",
                src.schema
            ),
        )
        .split(',')
        .map(|i| i.parse().unwrap())
        .collect();
    assert_eq!(ids.len(), 400);
    let first = ids[0];
    let id = |k: i64| first + k;

    // An event of agg-1 (every third row from the second) was dead-lettered before all
    // of these: with after_dead_letter = block the claim leaves agg-1 out, in every
    // part of either form.
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {}.outbox_dead_letter (id, event_id, aggregate_type, aggregate_id, \
             event_type, created_at, error) \
             VALUES ({}, gen_random_uuid(), 'order', 'agg-1', 'OrderChanged', now(), 'test')",
            src.schema,
            first - 1
        ),
    );
    let blocked = |i: i64| (i - first) % 3 == 1 && i < first + 400;
    let claim = |limit: i64, held: Vec<i64>| {
        let (store, client) = (&store, &client);
        async move {
            let mut got = Vec::new();
            for block in [false, true] {
                let rows = store
                    .claim(client, limit, 3, block, &held, 1_000_000)
                    .await
                    .unwrap();
                got.push(rows.iter().map(|e| e.id).collect::<Vec<_>>());
            }
            (got.remove(0), got.remove(0))
        }
    };
    let not_held = |held: &[i64], limit: usize, block: bool| -> Vec<i64> {
        ids.iter()
            .copied()
            .filter(|i| !held.contains(i))
            .filter(|i| !block || !blocked(*i))
            .take(limit)
            .collect()
    };

    // The list form: nothing held, a few held, held ids so sparse that the gaps
    // outnumber them. The gap form (64 held ids or more): a contiguous head, scattered
    // holds with gaps, a limit that spans the ids below and above the held ones.
    let cases: Vec<(i64, Vec<i64>)> = vec![
        (10, vec![]),
        (500, [3, 4, 7, 9, 12].map(id).to_vec()),
        (500, (0..100).map(|k| id(5 * k)).collect()),
        (150, (0..100).map(id).collect()),
        (500, (20..250).filter(|k| k % 7 != 0).map(id).collect()),
        (6, (4..120).map(id).collect()),
    ];
    for (limit, held) in cases {
        let (free, blocking) = claim(limit, held.clone()).await;
        assert_eq!(
            free,
            not_held(&held, limit as usize, false),
            "held {held:?}"
        );
        assert_eq!(
            blocking,
            not_held(&held, limit as usize, true),
            "held {held:?}, after_dead_letter = block"
        );
    }

    // A row that commits late, into a gap between held ids.
    let late_tx = common::connect(&src.url).await;
    late_tx.batch_execute("BEGIN").await.unwrap();
    let late: i64 = late_tx
        .query_one(
            &format!(
                "INSERT INTO {}.outbox (aggregate_type, aggregate_id, event_type, payload) \
                 VALUES ('order', 'late', 'OrderChanged', '{{}}') RETURNING id",
                src.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    sc.insert_events(src, 1, 1, 0);
    let after: i64 = pg
        .psql(
            "postgres",
            &format!("SELECT max(id) FROM {}.outbox", src.schema),
        )
        .parse()
        .unwrap();
    assert!(after > late);
    let held: Vec<i64> = ids.iter().copied().chain([after]).collect();
    assert_eq!(claim(100, held.clone()).await, (vec![], vec![]));
    late_tx.batch_execute("COMMIT").await.unwrap();
    assert_eq!(claim(100, held).await, (vec![late], vec![late]));
}

/// The relay's connections price sequential scans out, so a plan cached while a new outbox
/// looked empty still goes by the primary key once the table fills with dead tuples; the
/// lock connection also asks the server for keepalives; the URL's own options win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relays_connections_go_by_the_primary_key_and_the_urls_options_win() {
    use outbox_relay::db::DatabaseUrl;

    let sc = Scenario::builder()
        .source("plans")
        .no_broker()
        .migrated()
        .await;
    let src = sc.src();
    let url = DatabaseUrl::parse(&src.url).unwrap();
    let pool = url.pool(1, DEADLINE).unwrap();
    let client = pool.get().await.unwrap();
    assert_eq!(
        client
            .query_one("SHOW enable_seqscan", &[])
            .await
            .unwrap()
            .get::<_, String>(0),
        "off",
        "on the pool's connections"
    );
    // Never analyzed, as a new service's outbox is: the plan PostgreSQL caches for the
    // relay's prepared delete would scan it whole.
    client
        .batch_execute(&format!(
            "SET plan_cache_mode = force_generic_plan; \
             PREPARE d(bigint[]) AS DELETE FROM {}.outbox WHERE id = ANY($1)",
            src.schema
        ))
        .await
        .unwrap();
    let plan: Vec<String> = client
        .query("EXPLAIN EXECUTE d('{1,2}')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("outbox_pkey"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");

    let (lock, _notices) = url.connect(DEADLINE).await.unwrap();
    for (setting, want) in [
        ("enable_seqscan", "off"),
        ("jit", "off"),
        ("tcp_keepalives_idle", "10"),
    ] {
        let got: String = lock
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{setting} on the lock connection");
    }

    let own = DatabaseUrl::parse(&format!("{}?options=-c%20enable_seqscan%3Don", src.url)).unwrap();
    let client = own.pool(1, DEADLINE).unwrap().get().await.unwrap();
    let got: String = client
        .query_one("SHOW enable_seqscan", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, "on", "the URL's options win");
}

/// A claim reads about `CLAIM_BYTES` of payloads at most: large payloads are read apart
/// and the claim stops before the row that would go past the budget; the rows left
/// come with the next claim, in id order, their payloads whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_large_payloads_stops_at_its_byte_budget_and_loses_nothing() {
    use outbox_relay::db::DatabaseUrl;
    use outbox_relay::source::store::{Store, CLAIM_BYTES};

    let sc = Scenario::builder()
        .source("bytes")
        .no_broker()
        .migrated()
        .await;
    let (pg, src) = (&sc.pg, sc.src());
    // 5 small rows, 20 of 700 KB of text (md5 runs: no compression shortcut), 5 small.
    const BIG: usize = 700 * 1024;
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {s}.outbox (aggregate_type, aggregate_id, event_type, payload) \
               SELECT 'order', 'a', 'Small', jsonb_build_object('i', i) FROM generate_series(1, 5) i;
             INSERT INTO {s}.outbox (aggregate_type, aggregate_id, event_type, payload) \
               SELECT 'order', 'a', 'Big', to_jsonb(string_agg(md5(i::text || '-' || j::text), '')) \
               FROM generate_series(1, 20) i, generate_series(1, {BIG} / 32) j GROUP BY i ORDER BY i;
             INSERT INTO {s}.outbox (aggregate_type, aggregate_id, event_type, payload) \
               SELECT 'order', 'a', 'Small', jsonb_build_object('i', i) FROM generate_series(6, 10) i;",
            s = src.schema
        ),
    );
    let pool = DatabaseUrl::parse(&src.url)
        .unwrap()
        .pool(1, DEADLINE)
        .unwrap();
    let client = pool.get().await.unwrap();
    let store = Store::new(&src.schema);
    let mut held: Vec<i64> = Vec::new();
    let mut claims = Vec::new();
    loop {
        let got = store
            .claim(&client, 2000, 3, false, &held, 1_000_000)
            .await
            .unwrap();
        if got.is_empty() {
            break;
        }
        let bytes: usize = got
            .iter()
            .map(|e| e.payload.as_ref().map_or(0, String::len))
            .sum();
        assert!(
            bytes as i64 <= CLAIM_BYTES + BIG as i64,
            "a claim read {bytes} bytes of payloads"
        );
        for e in &got {
            assert!(e.defect.is_none(), "{:?}", e.defect);
            let len = e.payload.as_ref().map_or(0, String::len);
            match e.event_type.as_str() {
                "Big" => assert_eq!(len, BIG + 2, "a large payload, whole (a JSON string)"),
                _ => assert!(len < 100, "{len}"),
            }
        }
        claims.push(got.len());
        held.extend(got.iter().map(|e| e.id));
    }
    let mut sorted = held.clone();
    sorted.sort_unstable();
    assert_eq!(held, sorted, "claimed in id order across claims");
    assert_eq!(held.len(), 30, "every row claimed once: {claims:?}");
    assert!(claims.len() >= 2, "the budget split the rows: {claims:?}");
}

/// `record_format = "cloudevents"`: the records carry CloudEvents' Kafka binding
/// (binary mode) besides the contract's headers; a row's W3C trace context reaches
/// Kafka unchanged in either format.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloudevents_records_and_trace_context_reach_the_broker() {
    let sc = Scenario::builder()
        .source("cloud")
        .source("plain")
        .migrated()
        .await;
    let (cloud, plain) = (&sc.sources[0], &sc.sources[1]);
    let sc_config = sc
        .config
        .clone()
        .source_set(&cloud.name, "record_format", "cloudevents");
    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for src in [cloud, plain] {
        sc.pg.psql(
            "postgres",
            &format!(
                "INSERT INTO {}.outbox (aggregate_type, aggregate_id, event_type, payload, headers, created_at) \
                 VALUES ('order', 'o-7', 'OrderPlaced', '{{\"total\": 5}}', \
                         '{{\"traceparent\": \"{PARENT}\", \"tracestate\": \"congo=t61rcWkgMzE\"}}', \
                         '2026-12-05 07:52:33.123456+00'), \
                        ('order', 'o-7', 'OrderDeleted', NULL, NULL, now())",
                src.schema
            ),
        );
    }
    let mut relay = TestRelay::start(sc_config.settings()).await;
    let got = sc.consume(&cloud.topic, 2).await;
    let plain_got = sc.consume(&plain.topic, 2).await;
    relay.stop().await;

    let first = &got[0];
    assert_eq!(first.key.as_deref(), Some("o-7"));
    assert_eq!(header(first, "ce_specversion"), Some("1.0"));
    assert_eq!(header(first, "ce_id"), header(first, "event_id"));
    assert_eq!(header(first, "ce_type"), Some("OrderPlaced"));
    assert_eq!(
        header(first, "ce_source"),
        Some(format!("/outbox-relay/{}", cloud.name).as_str())
    );
    assert_eq!(
        header(first, "ce_time"),
        Some("2026-12-05T07:52:33.123456Z")
    );
    assert_eq!(header(first, "ce_subject"), Some("o-7"));
    assert_eq!(header(first, "content-type"), Some("application/json"));
    assert_eq!(header(first, "traceparent"), Some(PARENT));
    assert_eq!(header(first, "tracestate"), Some("congo=t61rcWkgMzE"));
    assert_eq!(first.value.as_deref(), Some("{\"total\": 5}"));
    // A tombstone has no data, so no content type.
    assert_eq!(header(&got[1], "ce_type"), Some("OrderDeleted"));
    assert_eq!(header(&got[1], "content-type"), None);
    assert_eq!(got[1].value, None);
    // The default format is unchanged: no CloudEvents header, the trace context kept.
    let p = &plain_got[0];
    assert!(
        p.headers
            .iter()
            .all(|(k, _)| !k.starts_with("ce_") && k != "content-type"),
        "{:?}",
        p.headers
    );
    assert_eq!(header(p, "traceparent"), Some(PARENT));
    assert_eq!(header(p, "tracestate"), Some("congo=t61rcWkgMzE"));
}
