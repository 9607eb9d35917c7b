//! The built `outbox-relay` binary against a real PostgreSQL and a tansu broker process:
//! migrate, run, kill -9 and restart, SIGTERM, bad configuration.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{audit, eventually_blocking, header, Metrics, RelayConfig, Scenario};

const BIN: &str = env!("CARGO_BIN_EXE_outbox-relay");
const DEADLINE: Duration = Duration::from_secs(90);

fn relay(config: &Path, args: &[&str], env: &[(&str, &str)], log: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--config").arg(config).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    c.env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    c
}

/// A relay process that is killed if the test fails before stopping it.
struct Relay(Child);

impl std::ops::Deref for Relay {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Relay {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(mut cmd: Command) -> Relay {
    Relay(cmd.spawn().expect("spawn outbox-relay"))
}

/// Waits for the relay to exit; on a timeout the test fails and [`Relay`]'s drop kills it.
fn wait_exit(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    eventually_blocking("the relay exits", deadline, || {
        child.try_wait().expect("try_wait")
    })
}

fn sigterm(child: &Child) {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
}

/// A scenario on tansu whose relay is the binary: each source of `names` called so, in
/// database `postgres`, with a topic of `partitions` partitions.
fn scenario(names: &[&str], partitions: i32) -> Scenario {
    names
        .iter()
        .fold(Scenario::builder(), |b, name| {
            b.named_source_in("postgres", name)
        })
        .tansu()
        .partitions(partitions)
        .deadline(DEADLINE)
        .build()
}

/// The scenario's configuration as a file of the binary's: one top-level `database_url`
/// for the sources in database `postgres` (which name none of their own), a 300 ms poll.
fn file_config(sc: &Scenario) -> RelayConfig {
    let config = sc
        .config
        .clone()
        .set("database_url", sc.pg.url("postgres"))
        .set("process_interval", "300ms");
    sc.sources
        .iter()
        .filter(|s| s.db == "postgres")
        .fold(config, |c, s| c.source_unset(&s.name, "database_url"))
}

/// A relay configuration file and the relay's log, in a directory of their own; the
/// schemas migrated by the binary.
struct Files {
    _dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
}

impl Files {
    fn migrated(config: &RelayConfig, env: &[(&str, &str)]) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        let files = Files {
            config: path,
            log: dir.path().join("relay.log"),
            _dir: dir,
        };
        let st = files.command(&["migrate"], env).status().unwrap();
        assert!(st.success(), "migrate: {}", files.log_text());
        files
    }

    /// The binary with this configuration, logging to this log.
    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        relay(&self.config, args, env, &self.log)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[test]
fn migrate_then_run_relays_four_services_in_two_databases_and_sigterm_drains() {
    let sc = Scenario::builder()
        .named_source_in("postgres", "customer")
        .named_source_in("postgres", "product")
        .named_source_in("catalog", "product-admin")
        .named_source_in("catalog", "product-loader")
        .tansu()
        .partitions(3)
        .set("operation_timeout", "10s")
        .set("batch_size", 100)
        .set("http.listen", format!("127.0.0.1:{}", common::free_port()))
        .deadline(DEADLINE)
        .build();
    let pg = &sc.pg;
    let config = sc
        .sources
        .iter()
        .filter(|s| s.db == "catalog")
        .fold(file_config(&sc), |c, s| {
            c.source_unset(&s.name, "database_url").source_set(
                &s.name,
                "database_url_env",
                "CATALOG_DATABASE_URL",
            )
        });
    // trust auth ignores the password; it is here to prove it never reaches a log line.
    let catalog_url = format!(
        "postgres://postgres:never-logged-pw@127.0.0.1:{}/catalog",
        pg.port
    );
    let env = [("CATALOG_DATABASE_URL", catalog_url.as_str())];

    let files = Files::migrated(&config, &env);
    let st = files.command(&["migrate"], &env).status().unwrap();
    assert!(st.success(), "second migrate is a no-op");
    let out = files.log_text();
    assert!(out.contains("customer: up to date"), "{out}");

    let per_source = [400usize, 300, 200, 100];
    for (s, n) in sc.sources.iter().zip(per_source) {
        sc.insert_events(s, n, 9, 0);
        pg.psql(
            &s.db,
            &format!(
                "BEGIN; INSERT INTO {}.outbox (aggregate_type, aggregate_id, event_type, payload) \
                 VALUES ('x', 'rolled-back', 'Never', '{{\"seq\": -1}}'); ROLLBACK;",
                s.schema
            ),
        );
    }

    let mut child = spawn(files.command(&["run"], &env));
    for (s, n) in sc.sources.iter().zip(per_source) {
        let got = sc.consume_blocking(&s.topic, n);
        let (distinct, dups, disorder) = audit(&got);
        eprintln!(
            "{}: relayed {distinct}, duplicated {dups}, out of order {disorder}",
            s.name
        );
        assert_eq!((distinct, dups, disorder), (n, 0, 0), "source {}", s.name);
        assert!(got.iter().all(|r| r.key.as_deref() != Some("rolled-back")));
        assert!(got
            .iter()
            .all(|r| header(r, "source") == Some(s.name.as_str())));
        sc.wait_outbox_empty_blocking(s);
    }
    // New rows while running are relayed too (woken by NOTIFY or the poll).
    let loader = &sc.sources[3];
    assert_eq!(loader.db, "catalog");
    sc.insert_events(loader, 50, 5, 1000);
    let got = sc.consume_blocking(&loader.topic, 150);
    assert_eq!(audit(&got), (150, 0, 0));

    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let out = files.log_text();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0:\n{out}");
    assert!(out.contains("relay stopped"), "{out}");
    assert!(
        !out.contains("never-logged-pw"),
        "a password reached the log:\n{out}"
    );
    let json_lines = out.lines().filter(|l| l.starts_with('{')).count();
    assert!(
        json_lines > 5,
        "logs are JSON lines when stdout is not a terminal:\n{out}"
    );
}

#[test]
fn kill_9_mid_stream_then_restart_loses_nothing() {
    let sc = scenario(&["killed"], 3);
    let src = sc.src();
    let files = Files::migrated(&file_config(&sc).set("batch_size", 100), &[]);
    let total = 40_000;
    sc.insert_events(src, total, 101, 0);

    let mut child = spawn(files.command(&["run"], &[]));
    eventually_blocking("the relay is mid-stream", DEADLINE, || {
        sc.outbox_rows(src) <= (total - 3000) as i64
    });
    child.kill().expect("kill -9"); // SIGKILL
    let _ = child.wait();
    let left = sc.outbox_rows(src);
    assert!(
        left > 0,
        "the relay finished before it was killed; the test proves nothing"
    );
    eprintln!("killed with {left} of {total} rows left");

    let mut child = spawn(files.command(&["run"], &[]));
    sc.wait_outbox_empty_blocking(src);
    let got = sc.consume_blocking(&src.topic, total);
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    let (distinct, dups, disorder) = audit(&got);
    eprintln!("after kill -9: relayed {distinct} of {total}, lost {}, duplicated {dups}, out of order {disorder}", total - distinct);
    assert_eq!(distinct, total, "nothing lost");
    assert_eq!(disorder, 0, "per-aggregate order kept across the crash");
}

#[test]
fn bad_configuration_exits_64_naming_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "batch_size = \"lots\"\nprocces_interval = 5\n[[sources]]\nname = \"a\"\nschema = \"A; drop table x\"\ntopic = \"t\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("check-config")
        .env("OUTBOX_OPERATION_TIMEOUT", "forever")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for key in [
        "batch_size",
        "procces_interval: unknown key",
        "sources[0].schema",
        "sources[0].database_url",
        "operation_timeout",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    let out = Command::new(BIN)
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

/// Every spelling of a password libpq accepts, each holding `Zq` in every part, so that
/// any piece of one that shows is found.
fn password_spellings(port: u16) -> Vec<String> {
    [
        "postgresql://role_a:ab/cd?x-Zq1@127.0.0.1:{port}/db_1",
        "postgresql://role_a:pa?ss-Zq2@127.0.0.1:{port}/db_2",
        "postgresql://role_a:p@ss-Zq3@127.0.0.1:{port}/db_3",
        "postgresql://role_a:Zq%40Zq4@127.0.0.1:{port}/db_4",
        "postgres://role_a:Zq%2FZq5@127.0.0.1:{port}/db_5",
        "postgres://role_a@127.0.0.1:{port}/db_6?password=Zq6&sslmode=disable",
        "host=127.0.0.1 port={port} dbname=db_7 user=role_a password='Zq7 two-Zq7part'",
        "host=127.0.0.1 port={port} dbname=db_8 user=role_a password = Zq8",
        "host=127.0.0.1 port={port} dbname=db_9 password=Zq9\\ x\\'Zq9",
        "postgres://role_a@127.0.0.1:{port}/db_10?sslmode=disable&password=p@ss-Zq10",
    ]
    .iter()
    .map(|s| s.replace("{port}", &port.to_string()))
    .collect()
}

#[test]
fn no_spelling_of_a_password_shows_in_check_config_the_log_connect_errors_or_health() {
    let closed = common::free_port();
    let http = common::free_port();
    let spellings = password_spellings(closed);
    let mut config = RelayConfig::default()
        .set("http.listen", format!("127.0.0.1:{http}"))
        .set("operation_timeout", "2s")
        .set(
            "kafka.brokers",
            format!("127.0.0.1:{}", common::free_port()),
        )
        .kafka_property("sasl.password", "Zq-kafka")
        .kafka_property("ssl.key.password", "Zq-key");
    for (i, url) in spellings.iter().enumerate() {
        let name = format!("s{i}");
        config = config.source(&common::TestSource {
            name: name.clone(),
            db: String::new(),
            url: url.clone(),
            schema: format!("s{i}"),
            topic: format!("t{i}"),
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    let log = dir.path().join("relay.log");

    let out = Command::new(BIN)
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        shown.matches("[redacted]").count(),
        spellings.len() + 2,
        "{shown}"
    );
    assert!(
        !shown.contains("Zq"),
        "check-config shows a secret:\n{shown}"
    );

    let mut relay = spawn(relay(
        &path,
        &["run"],
        &[("OUTBOX_LOG__FORMAT", "json")],
        &log,
    ));
    // Every database's connect error, on /health/deep and in the log.
    let deep = eventually_blocking("every database reports its connect error", DEADLINE, || {
        let (_, body) = common::http::get_blocking(([127, 0, 0, 1], http).into(), "/health/deep")?;
        (body.matches("connect to ").count() >= spellings.len()).then_some(body)
    });
    let logged = eventually_blocking("the log has every connect error", DEADLINE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.matches("connect to ").count() >= spellings.len()).then_some(text)
    });
    sigterm(&relay);
    wait_exit(&mut relay, DEADLINE);
    let logged = logged + &std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("/health/deep: {}", &deep[..deep.len().min(1500)]);
    assert!(logged.contains("effective configuration"), "{logged}");
    for (what, text) in [("/health/deep", &deep), ("the log", &logged)] {
        assert!(!text.contains("Zq"), "{what} shows a secret:\n{text}");
    }
}

#[test]
fn intervals_of_zero_exit_64_naming_the_key() {
    for (key, value) in [
        ("health.refresh_interval", "0s"),
        ("process_interval", "0"),
        ("retry.backoff_base", "0ms"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        let config = RelayConfig::default()
            .set("database_url", "postgres://relay@127.0.0.1:1/app")
            .set(key, value)
            .source(&common::TestSource {
                name: "a".into(),
                db: String::new(),
                url: "postgres://relay@127.0.0.1:1/app".into(),
                schema: "a".into(),
                topic: "a.events".into(),
            });
        std::fs::write(&path, config.to_toml()).unwrap();
        for command in ["check-config", "run"] {
            let out = Command::new(BIN)
                .arg("--config")
                .arg(&path)
                .arg(command)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{command} with {key} = {value}: {err}"
            );
            assert!(
                err.contains(&format!("{key}: must be greater than zero")),
                "{command}: {err}"
            );
        }
    }
}

/// Peak resident memory of a process, from the kernel.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

#[test]
fn a_64_mib_payload_is_dead_lettered_unread_and_memory_stays_bounded() {
    let sc = scenario(&["big"], 1);
    let src = sc.src().clone();
    let config = file_config(&sc).set("http.listen", format!("127.0.0.1:{}", common::free_port()));
    let files = Files::migrated(&config, &[]);
    sc.insert_events(&src, 100, 5, 0);
    sc.pg.psql(
        &src.db,
        &format!(
            "INSERT INTO {s}.outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('order', 'big-1', 'Huge', jsonb_build_object('blob', repeat('x', 64 * 1024 * 1024)))",
            s = src.schema
        ),
    );
    sc.insert_events(&src, 100, 5, 1000);
    let mut relay = spawn(files.command(&["run"], &[]));
    let got = sc.consume_blocking(&src.topic, 200);
    eventually_blocking("the big row is dead-lettered", DEADLINE, || {
        (sc.outbox_rows(&src) == 0 && sc.dead_letter_rows(&src) == 1).then_some(())
    });
    let peak = peak_rss_mib(relay.id());
    sigterm(&relay);
    wait_exit(&mut relay, DEADLINE);
    let error = sc.pg.psql(
        &src.db,
        &format!("SELECT error FROM {}.outbox_dead_letter", src.schema),
    );
    eprintln!("peak RSS {peak:.1} MiB; dead letter: {error}");
    assert_eq!(got.len(), 200, "every good row is delivered");
    assert!(
        error.contains("message_too_large") && error.contains("not read"),
        "{error}"
    );
    assert!(peak <= 96.0, "peak RSS {peak:.1} MiB > 96 MiB");
}

/// The binary runs on jemalloc with its built-in options (src/main.rs): a misspelt
/// option symbol would leave jemalloc's defaults, four arenas per CPU, in silence.
#[test]
fn the_binary_allocates_with_jemalloc_and_its_built_in_options() {
    let out = Command::new(BIN)
        .arg("--help")
        .env("MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    assert!(out.status.success());
    // jemalloc prints its statistics to stderr at exit.
    let stats = String::from_utf8_lossy(&out.stderr);
    for option in ["opt.narenas: 1", "opt.dirty_decay_ms: 1000"] {
        assert!(stats.contains(option), "{option} missing from:\n{stats}");
    }
}

#[test]
fn dead_letter_tool_lists_shows_replays_and_purges_without_sql() {
    let sc = Scenario::builder()
        .named_source_in("postgres", "orders")
        .no_broker()
        .build();
    let (pg, src) = (&sc.pg, sc.src());
    let files = Files::migrated(&file_config(&sc), &[]);
    let (config, schema) = (&files.config, &src.schema);
    // Three events the relay gave up on (as the settle step writes them).
    pg.psql(
        "postgres",
        &format!(
            "INSERT INTO {schema}.outbox_dead_letter (id, event_id, aggregate_type, aggregate_id, event_type, payload, idempotency_token, created_at, retry_count, failed_at, error) VALUES \
             (11, gen_random_uuid(), 'order', 'o-1', 'OrderPlaced', '{{\"total\": 5}}', 'tok-11', now() - interval '3 hours', 3, now() - interval '2 hours', 'unknown_topic: topic missing'), \
             (12, gen_random_uuid(), 'order', 'o-2', 'OrderPlaced', '{{\"total\": 7}}', NULL, now(), 0, now(), 'message_too_large: too big'), \
             (13, gen_random_uuid(), 'order', 'o-3', 'OrderCancelled', NULL, NULL, now(), 0, now(), 'invalid_record: headers');"
        ),
    );
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, table, err) = run(&["dead-letter", "list", "--source", "orders"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(table.starts_with("ID"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.contains("unknown_topic: topic missing"), "{table}");

    let (_, json, _) = run(&[
        "dead-letter",
        "list",
        "--source",
        "orders",
        "--event-type",
        "OrderPlaced",
        "--older-than",
        "1h",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{json}");
    assert_eq!(v[0]["id"], 11);

    let (code, shown, _) = run(&["dead-letter", "show", "--source", "orders", "--id", "11"]);
    assert_eq!(code, Some(0));
    assert!(
        shown.contains("\"total\": 5") && shown.contains("tok-11"),
        "{shown}"
    );

    let (code, _, err) = run(&["dead-letter", "replay", "--source", "orders"]);
    assert_ne!(code, Some(0), "replay without --id or --all refuses");
    assert!(err.contains("--all"), "{err}");

    let (code, out, err) = run(&[
        "dead-letter",
        "replay",
        "--source",
        "orders",
        "--id",
        "11",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["replayed"],
        serde_json::json!([11])
    );
    let back = pg.psql(
        "postgres",
        &format!("SELECT id, retry_count, idempotency_token, status FROM {schema}.outbox"),
    );
    assert_eq!(
        back, "11|0|tok-11|pending",
        "id and token kept, retries reset"
    );

    let (code, _, err) = run(&["dead-letter", "purge", "--source", "orders", "--all"]);
    assert_ne!(
        code,
        Some(0),
        "purge without --yes and without a terminal refuses"
    );
    assert!(err.contains("--yes"), "{err}");
    assert_eq!(sc.dead_letter_rows(src), 2);
    let (code, out, _) = run(&[
        "dead-letter",
        "purge",
        "--source",
        "orders",
        "--id",
        "12,13",
        "--yes",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.contains("purged 2"), "{out}");
    assert_eq!(sc.dead_letter_rows(src), 0);

    let (code, _, err) = run(&["dead-letter", "list", "--source", "nope"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no source named \"nope\""), "{err}");
}

/// `outbox_source_leader{source="..."}` of a running relay, read from its /metrics.
fn leader_gauge(port: u16, source: &str) -> Option<f64> {
    let (_, text) = common::http::get_blocking(([127, 0, 0, 1], port).into(), "/metrics")?;
    Metrics::parse(&text).value("outbox_source_leader", &[("source", source)])
}

#[test]
fn two_relay_processes_share_a_source_and_the_survivor_of_a_kill_9_takes_over() {
    let sc = scenario(&["pair"], 3);
    let src = sc.src();
    let files = Files::migrated(&file_config(&sc).set("batch_size", 50), &[]);
    let ports = [common::free_port(), common::free_port()];
    let listen: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut children: Vec<Relay> = listen
        .iter()
        .map(|l| spawn(files.command(&["run"], &[("OUTBOX_HTTP__LISTEN", l)])))
        .collect();
    let leaders = || ports.map(|p| leader_gauge(p, "pair").unwrap_or(0.0));
    eventually_blocking("one relay holds the source", DEADLINE, || {
        leaders().iter().sum::<f64>() == 1.0
    });
    let total = 20_000;
    sc.insert_events(src, total / 2, 37, 0);
    eventually_blocking("mid-stream", DEADLINE, || {
        sc.outbox_rows(src) < (total / 2 - 2000) as i64
    });
    assert_eq!(leaders().iter().sum::<f64>(), 1.0, "exactly one holder");
    let holder = if leaders()[0] == 1.0 { 0 } else { 1 };
    let other = 1 - holder;
    children[holder].kill().unwrap(); // SIGKILL, mid-stream
    let _ = children[holder].wait();
    let killed_at = Instant::now();
    sc.insert_events(src, total / 2, 37, 1000);
    eventually_blocking("the survivor takes the source", DEADLINE, || {
        leader_gauge(ports[other], "pair") == Some(1.0)
    });
    let takeover = killed_at.elapsed();
    sc.wait_outbox_empty_blocking(src);
    let got = sc.consume_blocking(&src.topic, total);
    sigterm(&children[other]);
    assert_eq!(
        wait_exit(&mut children[other], Duration::from_secs(10)).code(),
        Some(0)
    );
    let (distinct, dups, disorder) = audit(&got);
    eprintln!("two relays, leader killed: relayed {distinct}/{total}, duplicated {dups}, out of order {disorder}, takeover in {takeover:?}");
    assert_eq!(distinct, total, "nothing lost");
    assert_eq!(disorder, 0, "per-aggregate order kept");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
}

#[test]
fn a_frozen_broker_is_logged_once_at_its_start_and_once_at_its_end() {
    let sc = scenario(&["frozen"], 1);
    let (src, broker) = (sc.src(), sc.kafka.tansu());
    let files = Files::migrated(&file_config(&sc).set("operation_timeout", "2s"), &[]);
    let mut child = spawn(files.command(&["run"], &[]));
    sc.insert_events(src, 20, 4, 0);
    assert_eq!(sc.consume_blocking(&src.topic, 20).len(), 20);

    broker.pause(); // the broker stops answering: requests hang, then time out
    sc.insert_events(src, 30, 4, 100);
    let text = || files.log_text();
    eventually_blocking("the outage is logged", DEADLINE, || {
        text().contains("kafka unreachable")
    });
    std::thread::sleep(Duration::from_secs(8)); // several failed attempts: 2s timeouts, backoff
    broker.resume();
    eventually_blocking("the end of the outage is logged", DEADLINE, || {
        text().contains("kafka reachable again")
    });
    sc.wait_outbox_empty_blocking(src);
    sigterm(&child);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
    let out = text();
    let count = |needle: &str| out.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        count("kafka unreachable"),
        1,
        "one line at the start, not one per attempt:\n{out}"
    );
    assert_eq!(count("kafka reachable again"), 1, "{out}");
    let got = sc.consume_blocking(&src.topic, 50);
    assert_eq!(audit(&got).0, 50, "nothing lost");
    assert_eq!(audit(&got).2, 0);
    let warn_lines = out
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\""))
        .count();
    assert!(
        warn_lines <= 3,
        "no log flood during the outage ({warn_lines} warnings):\n{out}"
    );
}

/// How many of `names` the relay listening on `port` leads, by its /metrics.
fn leading(port: u16, names: &[String]) -> usize {
    let Some((_, text)) = common::http::get_blocking(([127, 0, 0, 1], port).into(), "/metrics")
    else {
        return 0;
    };
    let m = Metrics::parse(&text);
    names
        .iter()
        .filter(|n| m.value("outbox_source_leader", &[("source", n)]) == Some(1.0))
        .count()
}

#[test]
fn two_relay_processes_share_eight_sources_and_a_kill_9_and_a_restart_rebalance_them() {
    let names: Vec<String> = (0..8).map(|i| format!("shared{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let sc = scenario(&refs, 2);
    let files = Files::migrated(&file_config(&sc), &[]);
    let ports = [common::free_port(), common::free_port()];
    let start = |port: u16| {
        let listen = format!("127.0.0.1:{port}");
        spawn(files.command(&["run"], &[("OUTBOX_HTTP__LISTEN", &listen)]))
    };
    let mut children = [start(ports[0]), start(ports[1])];
    let mut written = 0;
    let mut write = |round: usize| {
        for src in &sc.sources {
            sc.insert_events(src, 40, 4, round * 10);
        }
        written += 40;
    };
    write(0);
    eventually_blocking("the two processes lead 4 sources each", DEADLINE, || {
        (leading(ports[0], &names), leading(ports[1], &names)) == (4, 4)
    });
    write(1);
    children[0].kill().unwrap(); // SIGKILL
    let _ = children[0].wait();
    let killed_at = Instant::now();
    write(2);
    eventually_blocking("the survivor leads all 8", DEADLINE, || {
        leading(ports[1], &names) == 8
    });
    let takeover = killed_at.elapsed();
    children[0] = start(ports[0]);
    let restarted_at = Instant::now();
    write(3);
    eventually_blocking(
        "the restarted process gets its share back",
        DEADLINE,
        || (leading(ports[0], &names), leading(ports[1], &names)) == (4, 4),
    );
    let rebalance = restarted_at.elapsed();
    write(4);
    for src in &sc.sources {
        let got = sc.consume_blocking(&src.topic, written);
        let (distinct, _dups, disorder) = audit(&got);
        assert_eq!(distinct, written, "{}: nothing lost", src.name);
        assert_eq!(disorder, 0, "{}: per-aggregate order kept", src.name);
    }
    for child in &mut children {
        sigterm(child);
        assert_eq!(wait_exit(child, Duration::from_secs(10)).code(), Some(0));
    }
    eprintln!("8 sources, 2 processes: takeover after kill -9 in {takeover:?}, rebalance after restart in {rebalance:?}");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    assert!(
        rebalance < Duration::from_secs(30),
        "rebalance took {rebalance:?}"
    );
}

#[test]
fn three_relay_processes_share_nine_sources_while_events_flow_through_a_kill_9_and_a_restart() {
    let names: Vec<String> = (0..9).map(|i| format!("trio{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let sc = scenario(&refs, 2);
    let files = Files::migrated(&file_config(&sc), &[]);
    let ports = [
        common::free_port(),
        common::free_port(),
        common::free_port(),
    ];
    let start = |port: u16| {
        let listen = format!("127.0.0.1:{port}");
        spawn(files.command(&["run"], &[("OUTBOX_HTTP__LISTEN", &listen)]))
    };
    let mut children = ports.map(start);
    let shares = || ports.map(|p| leading(p, &names));
    // Events flow the whole time: a writer inserts a round into every source until told
    // to stop, each round's seq continuing its aggregates' order.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (pg, sources) = (&sc.pg, &sc.sources);
    let written = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for src in sources {
                    common::outbox::insert_events(pg, src, 6, 3, rounds * 2);
                }
                rounds += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            rounds * 6
        });
        eventually_blocking("three processes lead 3 sources each", DEADLINE, || {
            shares() == [3, 3, 3]
        });
        children[0].kill().unwrap(); // SIGKILL
        let _ = children[0].wait();
        let killed_at = Instant::now();
        eventually_blocking("the two survivors lead all 9", DEADLINE, || {
            let [_, b, c] = shares();
            b + c == 9 && b <= 5 && c <= 5
        });
        let takeover = killed_at.elapsed();
        children[0] = start(ports[0]);
        let restarted_at = Instant::now();
        eventually_blocking(
            "the restarted process gets its share back",
            DEADLINE,
            || shares() == [3, 3, 3],
        );
        let rebalance = restarted_at.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        eprintln!("9 sources, 3 processes: takeover after kill -9 in {takeover:?}, rebalance after restart in {rebalance:?}");
        assert!(
            takeover < Duration::from_secs(10),
            "takeover took {takeover:?}"
        );
        assert!(
            rebalance < Duration::from_secs(30),
            "rebalance took {rebalance:?}"
        );
        writer.join().unwrap()
    });
    for src in &sc.sources {
        let got = sc.consume_blocking(&src.topic, written);
        let (distinct, _dups, disorder) = audit(&got);
        assert_eq!(distinct, written, "{}: nothing lost", src.name);
        assert_eq!(disorder, 0, "{}: per-aggregate order kept", src.name);
    }
    for child in &mut children {
        sigterm(child);
        assert_eq!(wait_exit(child, Duration::from_secs(10)).code(), Some(0));
    }
}

/// An nftables table of this test's, removed when dropped (also if the test fails).
struct Firewall(String);

/// `nft`, wherever the PATH of the test leaves it.
fn nft() -> Command {
    let sbin = Path::new("/usr/sbin/nft");
    Command::new(if sbin.exists() {
        sbin
    } else {
        Path::new("nft")
    })
}

impl Firewall {
    /// Drops every packet to and from `addr:port` (TCP) on this machine.
    fn cut(addr: &str, port: u16) -> Firewall {
        let table = format!("outbox_relay_test_{}", std::process::id());
        let script = format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority 0;\n  \
             ip daddr {addr} tcp dport {port} drop\n  ip saddr {addr} tcp sport {port} drop\n }}\n}}\n"
        );
        let st = nft()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait()
            })
            .expect("nft (nftables, run .ci/install-test-deps; the tests run as root)");
        assert!(st.success(), "nft refused the rule set:\n{script}");
        Firewall(table)
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = nft().args(["delete", "table", "inet", &self.0]).status();
    }
}

#[test]
fn a_replica_cut_off_from_postgres_stops_leading_and_the_other_takes_its_sources() {
    let names: Vec<String> = (0..4).map(|i| format!("cut{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let sc = scenario(&refs, 1);
    let files = Files::migrated(&file_config(&sc).set("operation_timeout", "5s"), &[]);
    // The replica to cut off reaches PostgreSQL on a second address of its own.
    sc.pg.psql(
        "postgres",
        "ALTER SYSTEM SET listen_addresses = '127.0.0.1,127.0.0.2'",
    );
    {
        use std::io::Write;
        let mut hba = std::fs::OpenOptions::new()
            .append(true)
            .open(sc.pg.data_dir().join("pg_hba.conf"))
            .unwrap();
        writeln!(hba, "host all all 127.0.0.2/32 trust").unwrap();
    }
    sc.pg.restart();
    let cut_url = format!("postgres://postgres@127.0.0.2:{}/postgres", sc.pg.port);
    let ports = [common::free_port(), common::free_port()];
    let listen: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let cut_env = [
        ("OUTBOX_HTTP__LISTEN", listen[0].as_str()),
        ("OUTBOX_DATABASE_URL", cut_url.as_str()),
    ];
    let mut cut = spawn(files.command(&["run"], &cut_env));
    let mut other = spawn(files.command(&["run"], &[("OUTBOX_HTTP__LISTEN", &listen[1])]));
    let mut written = 0;
    let mut write = |round: usize| {
        for src in &sc.sources {
            sc.insert_events(src, 20, 2, round * 10);
        }
        written += 20;
    };
    write(0);
    eventually_blocking("2 sources each", DEADLINE, || {
        (leading(ports[0], &names), leading(ports[1], &names)) == (2, 2)
    });
    let wall = Firewall::cut("127.0.0.2", sc.pg.port);
    let cut_at = Instant::now();
    write(1);
    eventually_blocking(
        "the cut-off replica stops saying it leads",
        DEADLINE,
        || leading(ports[0], &names) == 0,
    );
    let stopped = cut_at.elapsed();
    eventually_blocking("the other leads all 4", Duration::from_secs(90), || {
        leading(ports[1], &names) == 4
    });
    let taken = cut_at.elapsed();
    write(2);
    drop(wall);
    eventually_blocking("the healed replica gets its share back", DEADLINE, || {
        (leading(ports[0], &names), leading(ports[1], &names)) == (2, 2)
    });
    write(3);
    for src in &sc.sources {
        let got = sc.consume_blocking(&src.topic, written);
        let (distinct, _dups, disorder) = audit(&got);
        assert_eq!(distinct, written, "{}: nothing lost", src.name);
        assert_eq!(disorder, 0, "{}: per-aggregate order kept", src.name);
    }
    for child in [&mut cut, &mut other] {
        sigterm(child);
        let _ = wait_exit(child, Duration::from_secs(20));
    }
    eprintln!("cut off from PostgreSQL: stopped leading after {stopped:?}, the other led all after {taken:?}");
    assert!(
        stopped <= Duration::from_secs(5) + Duration::from_secs(2),
        "stopped leading after {stopped:?}, operation_timeout is 5s"
    );
    assert!(
        taken < Duration::from_secs(60),
        "taken over after {taken:?}"
    );
}

/// The Go client package end to end: its example program writes an event in a
/// transaction (as a service does, with a trace context), the relay binary publishes
/// it to tansu, and the record carries the key and headers the contract promises.
#[test]
fn an_event_the_go_writer_commits_reaches_kafka_as_the_contract_says() {
    let sc = scenario(&["go-writer"], 1);
    let src = sc.src().clone();
    let own_topic = format!("{}.go", src.schema);
    sc.kafka.create_topic(&own_topic, 1);
    let config = file_config(&sc).set("http.listen", format!("127.0.0.1:{}", common::free_port()));
    let files = Files::migrated(&config, &[]);
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let go = Command::new("go")
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/go/outbox"))
        .args(["run", "./cmd/outbox-write-example"])
        .args([
            &format!("{}?sslmode=disable", sc.pg.url("postgres")),
            &src.schema,
            "o-42",
            &own_topic,
        ])
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("TRACEPARENT", parent)
        .env("TRACESTATE", "congo=t61rcWkgMzE")
        .output()
        .expect("go (golang-go, installed by .ci/install-test-deps)");
    assert!(
        go.status.success(),
        "go run: {}",
        String::from_utf8_lossy(&go.stderr)
    );
    let mut relay = spawn(files.command(&["run"], &[]));
    let got = sc.consume_blocking(&own_topic, 1);
    sc.wait_outbox_empty_blocking(&src);
    sigterm(&relay);
    wait_exit(&mut relay, DEADLINE);
    let r = &got[0];
    assert_eq!(r.key.as_deref(), Some("o-42"));
    assert_eq!(r.value.as_deref(), Some("{\"total\": 5}"));
    for (name, want) in [
        ("event_type", "OrderPlaced"),
        ("aggregate_type", "order"),
        ("source", src.name.as_str()),
        ("correlation_id", "corr-o-42"),
        ("idempotency_token", "order-o-42-placed"),
        ("tenant", "acme"),
        ("traceparent", parent),
        ("tracestate", "congo=t61rcWkgMzE"),
    ] {
        assert_eq!(
            header(r, name),
            Some(want),
            "header {name}: {:?}",
            r.headers
        );
    }
    assert_eq!(header(r, "event_id").map(str::len), Some(36));
}
