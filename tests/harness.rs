//! Proves the shared test harness (tests/common) works against real servers.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use common::{
    consume, consume_async, create_topic, eventually, eventually_blocking, free_port, unique_name,
    Broker, Metrics, PgServer, Received, RelayConfig,
};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

const N: usize = 10;

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn pg_server_lifecycle() {
    let pg = PgServer::start();
    let db = unique_name("harness_db");
    pg.create_database(&db);
    assert_eq!(
        pg.url(&db),
        format!("postgres://postgres@127.0.0.1:{}/{db}", pg.port)
    );
    pg.psql(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
         INSERT INTO t VALUES (1, 'a'), (2, 'b');",
    );
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM t"), "2");
    assert_eq!(pg.psql(&db, "SELECT id, v FROM t ORDER BY id"), "1|a\n2|b");
    assert_eq!(pg.psql(&db, "SHOW max_connections"), "200");
    assert_eq!(pg.psql(&db, "SHOW fsync"), "off");
    assert_eq!(pg.psql(&db, "SHOW listen_addresses"), "127.0.0.1");

    // SQL errors panic with the server's message.
    let err = std::panic::catch_unwind(AssertUnwindSafe(|| pg.psql(&db, "SELECT nope FROM t")))
        .expect_err("bad SQL must panic");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("column \"nope\" does not exist"), "{msg}");

    // The URL works for the real client library.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = pg.url(&db);
    let n: i64 = rt.block_on(async {
        common::connect(&url)
            .await
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(n, 2);

    // stop keeps the data; restart comes back on the same port.
    let port = pg.port;
    pg.stop();
    assert!(!pg.is_running());
    assert!(!port_open(port), "port {port} still open after stop");
    pg.restart();
    assert_eq!(pg.port, port);
    assert_eq!(
        pg.psql(&db, "SELECT string_agg(v, ',' ORDER BY id) FROM t"),
        "a,b"
    );

    // kill = crash; committed data survives recovery.
    pg.psql(&db, "INSERT INTO t VALUES (3, 'c')");
    pg.kill();
    assert!(!port_open(port));
    pg.restart();
    assert_eq!(pg.psql(&db, "SELECT count(*) FROM t"), "3");

    // Drop stops the server and removes its files.
    let data = pg.data_dir().to_path_buf();
    assert!(data.join("PG_VERSION").exists());
    drop(pg);
    assert!(!data.exists(), "{} not removed", data.display());
    assert!(!port_open(port), "port {port} still open after drop");
}

#[test]
fn two_pg_servers_are_independent() {
    let a = PgServer::start();
    let b = PgServer::start();
    assert_ne!(a.port, b.port);
    a.psql("postgres", "CREATE TABLE only_in_a (x int)");
    assert_eq!(
        a.psql(
            "postgres",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"
        ),
        "1"
    );
    assert_eq!(
        b.psql(
            "postgres",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"
        ),
        "0"
    );
}

#[test]
fn helpers() {
    let a = unique_name("Order-Events");
    let b = unique_name("Order-Events");
    assert_ne!(a, b);
    assert!(a.starts_with("order_events_"), "{a}");
    for name in [&a, &b, &unique_name("9lives"), &unique_name("")] {
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}"
        );
        assert!(name.starts_with(|c: char| c.is_ascii_lowercase()), "{name}");
    }
    let (p, q) = (free_port(), free_port());
    assert_ne!(p, q);
    std::net::TcpListener::bind(("127.0.0.1", p)).expect("free_port is bindable");

    let mut calls = 0;
    eventually_blocking("third call", Duration::from_secs(5), || {
        calls += 1;
        calls == 3
    });
    assert_eq!(calls, 3);
    let err = std::panic::catch_unwind(|| {
        eventually_blocking("never", Duration::from_millis(100), || false)
    })
    .expect_err("must time out");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("never"), "{msg}");
    // What the condition saw last is in the message; a value it yields is returned.
    let err = std::panic::catch_unwind(|| {
        eventually_blocking("a row", Duration::from_millis(100), || {
            Err::<(), _>("3 rows left")
        })
    })
    .expect_err("must time out");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("a row") && msg.contains("3 rows left"),
        "{msg}"
    );
    let mut polls = 0;
    let got = eventually_blocking("some", Duration::from_secs(5), || {
        polls += 1;
        (polls == 2).then_some("found")
    });
    assert_eq!((got, polls), ("found", 2));

    // The same from async code, with an async condition.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut calls = 0;
    let got = rt.block_on(eventually(
        "third call",
        Duration::from_secs(5),
        async || {
            calls += 1;
            tokio::task::yield_now().await;
            (calls == 3).then_some(calls)
        },
    ));
    assert_eq!(got, 3);
}

#[test]
fn relay_config_overrides_apply_or_fail_loudly() {
    let src = common::TestSource {
        name: "orders".into(),
        db: "postgres".into(),
        url: "postgres://postgres@127.0.0.1:1/postgres".into(),
        schema: "orders_1".into(),
        topic: "orders_1.events".into(),
    };
    let config = RelayConfig::default()
        .set("kafka.brokers", "127.0.0.1:9")
        .source(&src)
        .set("operation_timeout", "1s")
        .set("batch_size", 40)
        .set("retry.after_dead_letter", "block")
        .kafka_property("message.max.bytes", "4000000")
        .source_set("orders", "topic", "elsewhere");
    let s = config.settings();
    assert_eq!(s.operation_timeout, Duration::from_secs(1));
    assert_eq!(s.process_interval, Duration::from_millis(200));
    assert_eq!(s.batch_size, 40);
    assert_eq!(
        s.retry.after_dead_letter,
        outbox_relay::config::AfterDeadLetter::Block
    );
    assert_eq!(s.kafka.properties["message.max.bytes"], "4000000");
    assert_eq!(s.sources[0].topic, "elsewhere");

    let panics = |f: Box<dyn FnOnce() + std::panic::UnwindSafe>| {
        let err = std::panic::catch_unwind(f).expect_err("must panic");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let typo = config.clone().set("operation_timout", "1s");
    let msg = panics(Box::new(move || drop(typo.settings())));
    assert!(msg.contains("operation_timout"), "{msg}");
    let bad = config.clone().set("batch_size", "lots");
    let msg = panics(Box::new(move || drop(bad.settings())));
    assert!(msg.contains("batch_size"), "{msg}");
    let gone = config.clone();
    let msg = panics(Box::new(move || drop(gone.unset("no_such_key"))));
    assert!(msg.contains("no_such_key"), "{msg}");
    let nobody = config.clone();
    let msg = panics(Box::new(move || {
        drop(nobody.source_set("nobody", "topic", "t"))
    }));
    assert!(msg.contains("nobody"), "{msg}");
}

#[test]
fn metrics_reads_values_by_name_and_labels() {
    let m = Metrics::parse(
        "# TYPE outbox_events_failed_total counter\n\
         outbox_events_failed_total{source=\"a\",reason=\"transport\"} 3\n\
         outbox_events_failed_total{source=\"a\",reason=\"other\"} 0\n\
         # TYPE outbox_source_leader gauge\n\
         outbox_source_leader{source=\"a\"} 1\n",
    );
    assert_eq!(
        m.value(
            "outbox_events_failed_total",
            &[("source", "a"), ("reason", "transport")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m.value("outbox_events_failed_total", &[("reason", "other")]),
        Some(0.0)
    );
    assert_eq!(m.value("outbox_source_leader", &[("source", "b")]), None);
    assert_eq!(m.of_source("outbox_source_leader", "a"), 1.0);
}

async fn produce_keyed(bootstrap: &str, topic: &str, n: usize) -> BTreeMap<String, (i32, i64)> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("message.timeout.ms", "15000")
        .create()
        .expect("producer");
    let mut delivered = BTreeMap::new();
    for i in 0..n {
        let key = format!("key-{i}");
        let value = format!("{{\"n\":{i}}}");
        let idx = i.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-id",
                value: Some(idx.as_str()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        let d = producer
            .send(
                FutureRecord::to(topic)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {key} to {topic}: {e}"));
        delivered.insert(key, (d.partition, d.offset));
    }
    delivered
}

fn check_received(
    topic: &str,
    partitions: i32,
    delivered: &BTreeMap<String, (i32, i64)>,
    got: &[Received],
) {
    assert_eq!(got.len(), N, "got {got:#?}");
    let mut by_key: HashMap<&str, &Received> = HashMap::new();
    for r in got {
        assert_eq!(r.topic, topic);
        assert!((0..partitions).contains(&r.partition), "{r:?}");
        let key = r.key.as_deref().expect("key");
        assert!(by_key.insert(key, r).is_none(), "duplicate {key}");
    }
    let mut used_partitions = std::collections::BTreeSet::new();
    for i in 0..N {
        let key = format!("key-{i}");
        let r = by_key
            .get(key.as_str())
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(r.value.as_deref(), Some(format!("{{\"n\":{i}}}").as_str()));
        assert_eq!(
            r.headers,
            vec![
                ("event-id".to_string(), i.to_string()),
                ("content-type".to_string(), "application/json".to_string()),
            ]
        );
        assert_eq!((r.partition, r.offset), delivered[&key], "{key}");
        used_partitions.insert(r.partition);
    }
    assert!(
        used_partitions.len() > 1,
        "10 keys all hashed to one partition? {used_partitions:?}"
    );
    // Per partition, records arrive in offset order.
    for p in 0..partitions {
        let offs: Vec<i64> = got
            .iter()
            .filter(|r| r.partition == p)
            .map(|r| r.offset)
            .collect();
        assert!(
            offs.windows(2).all(|w| w[0] < w[1]),
            "partition {p}: {offs:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_produce_consume_with_headers() {
    let broker = tokio::task::spawn_blocking(Broker::start).await.unwrap();
    let bootstrap = broker.bootstrap();
    assert_eq!(bootstrap, format!("127.0.0.1:{}", broker.port));
    let topic = unique_name("harness_topic");
    {
        let (b, t) = (bootstrap.clone(), topic.clone());
        tokio::task::spawn_blocking(move || create_topic(&b, &t, 3))
            .await
            .unwrap();
    }
    let delivered = produce_keyed(&bootstrap, &topic, N).await;
    let got = consume_async(&bootstrap, &topic, N, Duration::from_secs(20)).await;
    check_received(&topic, 3, &delivered, &got);

    // A second, independent read sees the same records (nothing was committed).
    let again = consume_async(&bootstrap, &topic, N, Duration::from_secs(20)).await;
    assert_eq!(again.len(), N);

    // Reading more than exists returns what is there once the deadline passes.
    let start = std::time::Instant::now();
    let short = consume_async(&bootstrap, &topic, N + 1, Duration::from_secs(1)).await;
    assert_eq!(short.len(), N);
    assert!(start.elapsed() >= Duration::from_secs(1));

    // A topic that never appears yields nothing (and is not auto-created by consume).
    let missing = unique_name("missing");
    assert!(
        consume_async(&bootstrap, &missing, 1, Duration::from_millis(500))
            .await
            .is_empty()
    );
}

#[test]
fn tansu_stop_restart_same_port() {
    let mut broker = Broker::start();
    let port = broker.port;
    let topic = unique_name("restart");
    create_topic(&broker.bootstrap(), &topic, 1);
    broker.stop();
    assert!(!port_open(port));
    broker.restart();
    assert_eq!(broker.port, port);
    // Memory storage: the topic is gone and can be created again.
    create_topic(&broker.bootstrap(), &topic, 2);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let delivered = rt.block_on(produce_keyed(&broker.bootstrap(), &topic, N));
    let got = consume(&broker.bootstrap(), &topic, N, Duration::from_secs(20));
    check_received(&topic, 2, &delivered, &got);
    drop(broker);
    assert!(!port_open(port), "tansu still listening after drop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_pause_resume_keeps_data() {
    let broker = tokio::task::spawn_blocking(Broker::start).await.unwrap();
    let bootstrap = broker.bootstrap();
    let topic = unique_name("pause");
    {
        let (b, t) = (bootstrap.clone(), topic.clone());
        tokio::task::spawn_blocking(move || create_topic(&b, &t, 3))
            .await
            .unwrap();
    }
    let delivered = produce_keyed(&bootstrap, &topic, N).await;
    broker.pause();
    // Nothing can be read while the broker is frozen...
    let during = consume_async(&bootstrap, &topic, 1, Duration::from_secs(1)).await;
    assert!(during.is_empty(), "{during:?}");
    broker.resume();
    // ...and everything is still there afterwards.
    let got = consume_async(&bootstrap, &topic, N, Duration::from_secs(20)).await;
    check_received(&topic, 3, &delivered, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_produce_consume_with_headers() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let topic = unique_name("harness_mock");
    // The mock broker has no CreateTopics API; create_topic() says so instead of hanging.
    let err = std::panic::catch_unwind(|| create_topic(&bootstrap, &topic, 3))
        .expect_err("create_topic on a MockCluster must panic");
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("mock.create_topic"), "{msg}");
    mock.create_topic(&topic, 3, 1).expect("mock create_topic");
    let delivered = produce_keyed(&bootstrap, &topic, N).await;
    let got = consume_async(&bootstrap, &topic, N, Duration::from_secs(20)).await;
    check_received(&topic, 3, &delivered, &got);
}
