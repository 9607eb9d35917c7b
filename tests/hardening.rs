//! Hardening against real PostgreSQL and librdkafka's mock cluster: sources that work as
//! their own roles, `migrate` by schema owners, and rows the relay cannot read.

mod common;

use common::{consume_async, eventually, Metrics, Scenario, TestRelay, TestSource};

/// Creates login role `role`, owning a fresh schema of `src`'s name, and points `src`'s
/// URL at it. The role may not create anything in the database.
fn owned_by(sc: &Scenario, src: &TestSource, role: &str) -> String {
    sc.pg.psql(
        &src.db,
        &format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}';
             REVOKE CREATE ON DATABASE {db} FROM PUBLIC;
             CREATE SCHEMA {schema} AUTHORIZATION {role};",
            db = src.db,
            schema = src.schema
        ),
    );
    format!(
        "postgres://{role}:pw-{role}@127.0.0.1:{}/{}",
        sc.pg.port, src.db
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_sources_of_one_database_each_migrate_and_claim_as_their_own_role() {
    let mut sc = Scenario::builder()
        .source("role_a")
        .source("role_b")
        .build();
    let (a, b) = (sc.sources[0].clone(), sc.sources[1].clone());
    let url_a = owned_by(&sc, &a, "relay_role_a");
    let url_b = owned_by(&sc, &b, "relay_role_b");
    sc.config = sc
        .config
        .clone()
        .source_set(&a.name, "database_url", url_a.as_str())
        .source_set(&b.name, "database_url", url_b.as_str());
    let settings = sc.settings();

    // Each owner migrates its existing schema without CREATE on the database.
    let applied = outbox_relay::migrate::migrate_all(&settings)
        .await
        .unwrap_or_else(|e| panic!("migrate as the schemas' owners: {e:#}"));
    assert_eq!(applied.len(), 2, "{applied:?}");
    assert!(applied.iter().all(|a| a.versions.len() == 6), "{applied:?}");
    // Each schema's tables belong to its role.
    for (src, role) in [(&a, "relay_role_a"), (&b, "relay_role_b")] {
        let owner = sc.pg.psql(
            &src.db,
            &format!(
                "SELECT tableowner FROM pg_tables WHERE schemaname = '{}' AND tablename = 'outbox'",
                src.schema
            ),
        );
        assert_eq!(owner, role);
    }

    sc.insert_events(&a, 300, 10, 0);
    sc.insert_events(&b, 300, 10, 0);
    let mut relay = TestRelay::start(settings).await;
    let got_a = consume_async(&sc.bootstrap(), &a.topic, 300, sc.deadline).await;
    let got_b = consume_async(&sc.bootstrap(), &b.topic, 300, sc.deadline).await;
    sc.wait_outbox_empty(&a).await;
    sc.wait_outbox_empty(&b).await;
    let roles = sc.pg.psql(
        "postgres",
        "SELECT string_agg(DISTINCT usename::text, ',' ORDER BY usename::text) \
         FROM pg_stat_activity WHERE application_name = 'outbox-relay'",
    );
    relay.stop().await;
    assert_eq!((got_a.len(), got_b.len()), (300, 300));
    assert_eq!(roles, "relay_role_a,relay_role_b", "the relay's sessions");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rows_with_nulls_the_contract_forbids_are_dead_lettered_naming_the_column() {
    let sc = Scenario::builder().source("legacy").build();
    let src = sc.src().clone();
    // A table that predates the relay, as older services created theirs.
    sc.pg.psql(
        &src.db,
        &format!(
            "CREATE SCHEMA {s};
             CREATE TABLE {s}.outbox (
                 id serial PRIMARY KEY,
                 event_id varchar(64) DEFAULT gen_random_uuid()::text,
                 aggregate_type varchar(255),
                 aggregate_id varchar(255),
                 event_type varchar(255),
                 payload jsonb,
                 created_at timestamptz DEFAULT now()
             );",
            s = src.schema
        ),
    );
    let applied = outbox_relay::migrate::migrate_all(&sc.settings())
        .await
        .expect("migrate a pre-existing table");
    let said = applied[0].contradictions.join("\n");
    assert!(
        said.contains(".event_id is character varying(64), where the contract has uuid"),
        "{said}"
    );
    for column in ["aggregate_type", "aggregate_id", "event_type"] {
        assert!(
            said.contains(&format!(".{column} allows NULL")) && said.contains("SET NOT NULL"),
            "{column} not reported:\n{said}"
        );
    }
    let insert = |agg: &str, event_type: &str, n: usize| {
        sc.pg.psql(
            &src.db,
            &format!(
                "INSERT INTO {s}.outbox (aggregate_type, aggregate_id, event_type, payload) \
                 SELECT 'order', {agg}, {event_type}, jsonb_build_object('seq', i) \
                 FROM generate_series(1, {n}) i",
                s = src.schema
            ),
        );
    };
    insert("'o-' || (i % 7)", "'OrderPlaced'", 40);
    insert("NULL", "'OrderPlaced'", 1);
    insert("'o-bad'", "NULL", 1);
    sc.pg.psql(
        &src.db,
        &format!(
            "INSERT INTO {s}.outbox (event_id, aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('not-a-uuid', 'order', 'o-uuid', 'OrderPlaced', '{{}}')",
            s = src.schema
        ),
    );
    insert("'o-' || (i % 7)", "'OrderPlaced'", 41);

    let relay = TestRelay::start(sc.settings()).await;
    let got = consume_async(&sc.bootstrap(), &src.topic, 81, sc.deadline).await;
    sc.wait_outbox_empty(&src).await;
    assert_eq!(got.len(), 81, "every good row is delivered");
    let dead = sc.pg.psql(
        &src.db,
        &format!(
            "SELECT string_agg(error, E'\\n' ORDER BY id) FROM {}.outbox_dead_letter",
            src.schema
        ),
    );
    assert_eq!(sc.dead_letter_rows(&src), 3, "{dead}");
    assert!(
        dead.contains("column aggregate_id is NULL")
            && dead.contains("column event_type is NULL")
            && dead.contains("column event_id is not a UUID"),
        "{dead}"
    );
    let (_, text) = relay.get("/metrics").await;
    let m = Metrics::parse(&text);
    assert_eq!(
        m.of_source("outbox_source_up", &src.name),
        1.0,
        "the source stays up"
    );
    // The dead-letter tool shows them, replays one (delivered with an empty key) and
    // purges the other.
    use outbox_relay::dead_letter::{self, Filter};
    let settings = sc.settings();
    let source = &settings.sources[0];
    let timeout = settings.operation_timeout;
    let listed = dead_letter::list(source, &Filter::default(), 10, true, timeout)
        .await
        .expect("list");
    assert_eq!(listed.len(), 3);
    assert!(dead_letter::table(&listed).contains("invalid_record"));
    let id_of = |column: &str| {
        listed
            .iter()
            .find(|e| e.error.contains(&format!("column {column} is NULL")))
            .unwrap_or_else(|| panic!("no dead letter names {column}: {listed:?}"))
            .id
    };
    let (null_key, null_type) = (id_of("aggregate_id"), id_of("event_type"));
    let only = |id: i64| Filter {
        ids: vec![id],
        ..Filter::default()
    };
    let replayed = dead_letter::replay(source, &only(null_key), timeout)
        .await
        .expect("replay");
    assert_eq!(replayed, vec![null_key]);
    let purged = dead_letter::purge(source, &only(null_type), timeout)
        .await
        .expect("purge");
    assert_eq!(purged, vec![null_type]);
    let bad_uuid = listed
        .iter()
        .find(|e| e.error.contains("column event_id is not a UUID"))
        .expect("the row with a bad event_id")
        .id;
    let purged = dead_letter::purge(source, &only(bad_uuid), timeout)
        .await
        .expect("purge");
    assert_eq!(purged, vec![bad_uuid]);
    let again = consume_async(&sc.bootstrap(), &src.topic, 82, sc.deadline).await;
    assert!(
        again.iter().any(|r| r.key.as_deref() == Some("")),
        "the replayed row is delivered"
    );
    assert_eq!(sc.dead_letter_rows(&src), 0);

    // And it goes on: a row after them is delivered too.
    insert("'o-after'", "'OrderPlaced'", 1);
    eventually(
        "the row after them is delivered",
        sc.deadline,
        async || match sc.outbox_rows(&src) {
            0 => Ok(()),
            n => Err(format!("{n} rows left")),
        },
    )
    .await;
}
