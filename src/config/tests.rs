//! Loading, layering and validation of the settings.
use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const ONE_SOURCE: &str = r#"
database_url = "postgres://relay:pw@db:5432/app"
[[sources]]
name = "customer"
schema = "customer"
topic = "customer.events"
"#;

#[test]
fn defaults_follow_the_plan() {
    let s = Settings::from_parts(Some(ONE_SOURCE), &env(&[])).unwrap();
    assert_eq!(s.batch_size, 10);
    assert_eq!(s.delete_batch_size, 50);
    assert_eq!(s.process_interval, Duration::from_secs(5));
    assert_eq!(s.max_retries, 3);
    assert_eq!(s.dead_letter_size, 1000);
    assert_eq!(s.operation_timeout, Duration::from_secs(30));
    assert!(s.enabled);
    assert_eq!(s.http.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(s.sources[0].schema, "customer");
}

#[test]
fn environment_overrides_file_and_bare_numbers_are_seconds() {
    let s = Settings::from_parts(
        Some(ONE_SOURCE),
        &env(&[
            ("OUTBOX_BATCH_SIZE", "500"),
            ("OUTBOX_PROCESS_INTERVAL", "5"),
            ("OUTBOX_OPERATION_TIMEOUT", "250ms"),
            ("OUTBOX_ENABLED", "false"),
            ("OUTBOX_KAFKA__BROKERS", "k1:9092,k2:9092"),
            ("OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ("OUTBOX_HTTP__LISTEN", "127.0.0.1:9000"),
            ("OUTBOX_CONFIG", "/ignored.toml"),
        ]),
    );
    // 250ms is below the 1s floor of operation_timeout: reported, not silently accepted.
    let err = s.unwrap_err();
    assert_eq!(
        err.0,
        vec!["operation_timeout: must be at least 1s".to_string()]
    );

    let s = Settings::from_parts(
        Some(ONE_SOURCE),
        &env(&[
            ("OUTBOX_BATCH_SIZE", "500"),
            ("OUTBOX_PROCESS_INTERVAL", "0.25"),
            ("OUTBOX_ENABLED", "false"),
            ("OUTBOX_KAFKA__BROKERS", "k1:9092,k2:9092"),
            ("OUTBOX_KAFKA__PROPERTIES__SASL_PASSWORD", "hunter2"),
            ("OUTBOX_HTTP__LISTEN", "127.0.0.1:9000"),
        ]),
    )
    .unwrap();
    assert_eq!(s.batch_size, 500);
    assert_eq!(s.process_interval, Duration::from_millis(250));
    assert!(!s.enabled);
    assert_eq!(s.kafka.brokers, "k1:9092,k2:9092");
    assert_eq!(s.kafka.properties["sasl.password"], "hunter2");
    assert_eq!(s.http.listen.port(), 9000);
    let shown = s.redacted_toml();
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains(":pw@"), "{shown}");
}

#[test]
fn the_plans_lowercase_names_work_as_environment_variables() {
    let s = Settings::from_parts(
        Some(ONE_SOURCE),
        &env(&[
            ("outbox_batch_size", "25"),
            ("outbox_kafka__brokers", "k:9092"),
        ]),
    )
    .unwrap();
    assert_eq!(s.batch_size, 25);
    assert_eq!(s.kafka.brokers, "k:9092");
    let err = Settings::from_parts(
        Some(ONE_SOURCE),
        &env(&[("outbox_batch_size", "25"), ("OUTBOX_BATCH_SIZE", "26")]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("set twice"), "{err}");
    let err =
        Settings::from_parts(Some(ONE_SOURCE), &env(&[("outbox_bach_size", "25")])).unwrap_err();
    assert!(err.to_string().contains("bach_size: unknown key"), "{err}");
    let s =
        Settings::from_parts(Some(ONE_SOURCE), &env(&[("OUTBOX_IN_FLIGHT_BATCHES", "1")])).unwrap();
    assert_eq!(s.in_flight_batches, 1);
}

#[test]
fn every_bad_key_is_reported_at_once() {
    let toml = r#"
batch_sise = 5
batch_size = 0
in_flight_batches = 65
process_interval = "soon"
[kafka]
brokers = ""
[kafka.properties]
acks = "1"
[[sources]]
name = "a"
schema = "Bad-Schema; drop table x"
topic = "bad topic"
[[sources]]
schema = "b"
"#;
    let err = Settings::from_parts(Some(toml), &env(&[])).unwrap_err();
    let text = err.to_string();
    for needle in [
        "batch_sise: unknown key",
        "batch_size: 0 is outside",
        "in_flight_batches: 65 is outside",
        "process_interval:",
        "kafka.brokers:",
        "kafka.properties.acks:",
        "sources[0].schema:",
        "sources[0].topic:",
        "sources[0].database_url: not set",
        "sources[1].name: required",
        "sources[1].topic: required",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn a_source_url_can_come_from_a_named_environment_variable() {
    let toml = r#"
[[sources]]
name = "customer"
schema = "customer"
topic = "customer.events"
database_url_env = "CUSTOMER_DATABASE_URL"
"#;
    let err = Settings::from_parts(Some(toml), &env(&[])).unwrap_err();
    assert!(err.to_string().contains("CUSTOMER_DATABASE_URL is not set"));
    let s = Settings::from_parts(
        Some(toml),
        &env(&[("CUSTOMER_DATABASE_URL", "postgres://u:secret@h/db")]),
    )
    .unwrap();
    assert_eq!(s.sources[0].database_url.identity(), "h:5432/db");
    assert!(!s.redacted_toml().contains("secret"));
}

#[test]
fn two_sources_on_one_schema_of_one_database_are_refused() {
    let toml = r#"
database_url = "postgres://u@h/db"
[[sources]]
name = "a"
topic = "t"
[[sources]]
name = "b"
topic = "t"
"#;
    let err = Settings::from_parts(Some(toml), &env(&[])).unwrap_err();
    assert!(err.to_string().contains("used by two sources"), "{err}");
}

#[test]
fn the_shipped_example_loads_with_urls_from_the_environment() {
    let url = "postgres://relay:pw@db:5432/platform?sslmode=verify-full";
    let env = env(&[
        ("CUSTOMER_DATABASE_URL", url),
        ("PRODUCT_DATABASE_URL", url),
        ("PRODUCT_ADMIN_DATABASE_URL", url),
        ("PRODUCT_LOADER_DATABASE_URL", url),
    ]);
    let s = Settings::from_parts(Some(include_str!("../../config/default.toml")), &env).unwrap();
    let names: Vec<_> = s.sources.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["customer", "product", "product-admin", "product-loader"]
    );
    assert_eq!((s.batch_size, s.delete_batch_size), (100, 100));
    assert_eq!(s.in_flight_batches, 4);
    assert_eq!(s.kafka.properties["compression.type"], "lz4");
}

#[test]
fn durations_accept_seconds_and_humantime() {
    assert_eq!(
        parse_duration(&Value::from(5)).unwrap(),
        Duration::from_secs(5)
    );
    assert_eq!(
        parse_duration(&Value::from("5")).unwrap(),
        Duration::from_secs(5)
    );
    assert_eq!(
        parse_duration(&Value::from("250ms")).unwrap(),
        Duration::from_millis(250)
    );
    assert_eq!(
        parse_duration(&Value::from("1m 30s")).unwrap(),
        Duration::from_secs(90)
    );
    assert!(parse_duration(&Value::from("-1")).is_err());
    assert!(parse_duration(&Value::from(true)).is_err());
}

#[test]
fn identifiers_and_topics() {
    assert!(is_identifier("product_admin"));
    assert!(!is_identifier("Product"));
    assert!(!is_identifier("1abc"));
    assert!(!is_identifier("a\"; drop"));
    assert!(validate_topic("customer.events").is_ok());
    assert!(validate_topic("bad topic").is_err());
    assert!(validate_topic("..").is_err());
    assert!(validate_topic(&"x".repeat(250)).is_err());
}

#[test]
fn pattern_sources_name_their_schemas_and_refuse_what_cannot_work() {
    let toml = r#"
database_url = "postgres://u:pw@h/db"
coordination_url = "postgres://u:pw@direct/db"
[[sources]]
name = "tenant-{schema}"
schema_pattern = "tenant_*"
topic = "{schema}.events"
[[sources]]
name = "orders"
schema = "orders"
topic = "orders.events"
"#;
    let s = Settings::from_parts(Some(toml), &env(&[])).unwrap();
    assert_eq!(s.sources.len(), 1);
    let p = &s.patterns[0];
    let t = p.source_for("tenant_acme");
    assert_eq!(
        (t.name.as_str(), t.topic.as_str()),
        ("tenant-tenant_acme", "tenant_acme.events")
    );
    // Sources on the shared URL take the shared coordination URL.
    assert_eq!(
        s.sources[0].coordination_url.as_ref().unwrap().identity(),
        "direct:5432/db"
    );
    assert!(p.coordination_url.is_some());
    assert!(!s.redacted_toml().contains("pw"), "{}", s.redacted_toml());
    // The dead-letter CLI finds a pattern source by its name.
    assert_eq!(
        s.source("tenant-tenant_acme").unwrap().schema,
        "tenant_acme"
    );
    assert!(s.source("tenant-other_acme").is_err());
    assert!(s.source("tenant-tenant_Bad").is_err());

    let bad = r#"
database_url = "postgres://u@h/db"
[[sources]]
name = "tenant"
schema_pattern = "tenant_*"
topic = "t"
[[sources]]
name = "x-{schema}"
schema = "x"
topic = "t"
[[sources]]
name = "y-{schema}"
schema_pattern = "Tenant-*"
topic = "t"
[[sources]]
name = "z-{schema}"
schema_pattern = "zeta"
topic = "t"
[[sources]]
name = "w-{schema}"
schema = "w"
schema_pattern = "w_*"
topic = "t"
[[sources]]
name = "v-{schema}"
schema_pattern = "v_*"
topic = "t"
database_url = "postgres://u@h/db"
coordination_url = "postgres://u@elsewhere/db"
"#;
    let err = Settings::from_parts(Some(bad), &env(&[]))
        .unwrap_err()
        .to_string();
    for needle in [
        "sources[0].name: \"tenant\" must contain {schema}",
        "sources[1].name: {schema} is only replaced for a schema_pattern source",
        "sources[2].schema_pattern: \"Tenant-*\" holds 'T'",
        "sources[3].schema_pattern: \"zeta\" has no wildcard",
        "sources[4].schema and sources[4].schema_pattern: set one, not both",
        "sources[5].coordination_url: sources of database h:5432/db name different coordination URLs",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
}

#[test]
fn schema_patterns_are_globs_whose_underscore_is_literal_and_never_match_system_schemas() {
    let p = SchemaPattern::parse("tenant_*").unwrap();
    assert!(p.matches("tenant_acme"));
    assert!(p.matches("tenant_"));
    assert!(!p.matches("tenantxacme"));
    assert!(!p.matches("other_tenant_acme"));
    assert_eq!(p.like(), "tenant\\_%");
    let q = SchemaPattern::parse("t?_*").unwrap();
    assert!(q.matches("t1_x") && !q.matches("t12_x"));
    assert_eq!(q.like(), "t_\\_%");
    let all = SchemaPattern::parse("*").unwrap();
    assert!(all.matches("public"));
    for system in ["pg_catalog", "pg_toast", "information_schema"] {
        assert!(!all.matches(system), "{system}");
    }
}
