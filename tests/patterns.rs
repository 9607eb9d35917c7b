//! Sources by pattern: a `[[sources]]` entry with `schema_pattern` relays every schema
//! of its database that matches and holds an outbox table, found at start and every
//! `discovery_interval`; `migrate` migrates every matching schema.

mod common;

use common::{
    audit, eventually, header, unique_name, Metrics, Scenario, TestRelay, TestSource, DEADLINE,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn matching_schemas_are_migrated_found_relayed_and_dropped_ones_stopped() {
    let sc = Scenario::builder().build();
    let prefix = unique_name("tenant");
    let topic = format!("{prefix}.events");
    sc.kafka.create_topic(&topic, 1);
    let tenant = |t: &str| TestSource {
        name: format!("t-{prefix}_{t}"),
        db: "postgres".into(),
        url: sc.pg.url("postgres"),
        schema: format!("{prefix}_{t}"),
        topic: topic.clone(),
    };
    let (a, b, c, bare) = (tenant("a"), tenant("b"), tenant("c"), tenant("bare"));
    // `{prefix}_a` and `_b` exist; `migrate` gives them their outbox. `{prefix}x_y` does
    // not match (the `_` of the pattern is a literal, not LIKE's any-character).
    sc.pg.psql(
        "postgres",
        &format!(
            "CREATE SCHEMA {}; CREATE SCHEMA {}; CREATE SCHEMA {prefix}x_y",
            a.schema, b.schema
        ),
    );
    let config = sc.config.clone().set("discovery_interval", "1s").pattern(
        "t-{schema}",
        &sc.pg.url("postgres"),
        &format!("{prefix}_*"),
        &topic,
    );
    let settings = config.settings();
    let applied = outbox_relay::migrate::migrate_all(&settings).await.unwrap();
    let names: Vec<&str> = applied.iter().map(|x| x.source.as_str()).collect();
    assert_eq!(names, [a.name.as_str(), b.name.as_str()], "{applied:?}");
    assert!(applied.iter().all(|x| !x.versions.is_empty()));

    let mut relay = TestRelay::start(settings).await;
    sc.insert_events(&a, 10, 2, 0);
    sc.insert_events(&b, 10, 2, 0);
    let got = sc.consume(&topic, 20).await;
    assert_eq!(audit(&got).0, 20);
    for src in [&a, &b] {
        let n = got
            .iter()
            .filter(|r| header(r, "source") == Some(src.name.as_str()))
            .count();
        assert_eq!(n, 10, "{} has its own source name on its records", src.name);
    }

    // A tenant added while the relay runs: migrated, then found within the interval.
    // One that matches but has no outbox table is not started.
    sc.pg.psql(
        "postgres",
        &format!("CREATE SCHEMA {}; CREATE SCHEMA {}", c.schema, bare.schema),
    );
    let s = config.settings();
    let new = s.patterns[0].source_for(&c.schema);
    outbox_relay::migrate::migrate_source(&new, s.operation_timeout)
        .await
        .unwrap();
    sc.insert_events(&c, 10, 2, 0);
    let got = sc.consume(&topic, 30).await;
    assert_eq!(audit(&got).0, 30, "the new tenant's events arrive");
    assert!(
        relay.running().state(&bare.name).is_none(),
        "no outbox table, no source"
    );

    // A tenant dropped: its source stops, and its series leave /metrics.
    sc.pg
        .psql("postgres", &format!("DROP SCHEMA {} CASCADE", b.schema));
    eventually(
        "the dropped tenant's source stopped",
        DEADLINE,
        async || relay.running().state(&b.name).is_none(),
    )
    .await;
    let (_, text) = relay.get("/metrics").await;
    let m = Metrics::parse(&text);
    assert!(m
        .value("outbox_source_up", &[("source", &b.name)])
        .is_none());
    assert!(m
        .value("outbox_source_up", &[("source", &a.name)])
        .is_some());
    assert_eq!(relay.running().source_names().len(), 2);
    relay.stop().await;
}
