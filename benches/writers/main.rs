//! `cargo bench --bench writers`: what the relay costs the services' commits, and what
//! the configuration as shipped does for latency, CPU and a backlog. See
//! benches/README.md.
//!
//! One run: a private PostgreSQL (`fsync = on`, the data directory on tmpfs when there
//! is room) with the platform's four sources in two databases, migrated by the relay;
//! librdkafka's mock cluster in its own process; the relay's release binary. Then:
//! 1. writer cost: pgbench clients (16 and 64), one-row INSERT transactions into
//!    (1) a table identical to the outbox with no trigger and nothing reading it,
//!    (2) the outbox with its user triggers disabled and the relay polling every
//!    10 ms, (3) the outbox and the relay as shipped; in interleaved rounds, medians;
//! 2. with the relay as shipped and the platform ConfigMap's settings: commit to Kafka
//!    at 1,000 and at 5 one-row transactions a second (p50, p99, the relay's CPU), its
//!    idle CPU, and a backlog's drain against the one-statement floor.

#![allow(dead_code)] // the relay bench's modules, of which this bench uses a part

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../relay/kafka.rs"]
mod kafka;
#[path = "../relay/mock_broker.rs"]
mod mock_broker;
#[path = "../relay/relay_process.rs"]
mod relay_process;
#[path = "../relay/workload.rs"]
mod workload;
#[macro_use]
#[path = "../shared/mod.rs"]
mod shared;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, Metrics, PgServer};
use kafka::{CountingConsumer, LatencyBook, DRAIN_FETCH_WAIT_MS};
use mock_broker::MockBroker;
use relay_process::{proc_stats, RelayProcess};
use shared::{env_num, median, percentile, quick};
use toml::Value;

/// The platform's sources: (database, schema, topic).
const SOURCES: [(&str, &str, &str); 4] = [
    ("platform", "customer", "customer.events"),
    ("platform", "product", "product.events"),
    ("catalog", "product_admin", "product-admin.events"),
    ("catalog", "product_loader", "product-loader.events"),
];

/// Partitions of the drain's topic.
const DRAIN_PARTITIONS: i32 = 16;

/// Options, from BENCH_* environment variables.
struct Opts {
    /// Seconds of each pgbench run (BENCH_WRITERS_SECS).
    secs: u64,
    /// Rounds of every writer contender, interleaved (BENCH_WRITERS_ROUNDS).
    rounds: usize,
    /// pgbench clients (BENCH_WRITERS_CLIENTS, comma-separated).
    clients: Vec<u32>,
    /// Measured seconds at 1,000 transactions a second (BENCH_LATENCY_SECS).
    latency_secs: f64,
    /// Measured seconds at 5 a second (BENCH_SLOW_SECS).
    slow_secs: f64,
    /// Idle seconds measured (BENCH_IDLE_SECS).
    idle_secs: u64,
    /// Backlog of the drain (BENCH_EVENTS).
    backlog: u64,
    /// Rounds of the drain and its floor (BENCH_ROUNDS).
    drain_rounds: usize,
}

impl Opts {
    fn from_env() -> Opts {
        let quick = quick();
        Opts {
            secs: env_num("BENCH_WRITERS_SECS", if quick { 3 } else { 8 }),
            rounds: env_num("BENCH_WRITERS_ROUNDS", if quick { 1 } else { 2 }),
            clients: std::env::var("BENCH_WRITERS_CLIENTS")
                .ok()
                .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
                .unwrap_or_else(|| vec![16, 64]),
            latency_secs: env_num("BENCH_LATENCY_SECS", if quick { 3.0 } else { 10.0 }),
            slow_secs: env_num("BENCH_SLOW_SECS", if quick { 4.0 } else { 20.0 }),
            idle_secs: env_num("BENCH_IDLE_SECS", if quick { 10 } else { 30 }),
            backlog: env_num("BENCH_EVENTS", if quick { 20_000 } else { 100_000 }),
            drain_rounds: env_num("BENCH_ROUNDS", if quick { 1 } else { 3 }),
        }
    }
}

fn main() {
    let opts = Opts::from_env();
    shared::bench_main("writers", |t0| async move { run(&opts, t0).await });
}

/// The platform ConfigMap's relay settings (`outbox-relay-config`), as configuration
/// keys: the plan's batch sizes, interval, retries, timeouts, and the producer queue
/// bound; not its brokers, TLS, HTTP or logging, which are the bench's.
fn configmap_settings() -> BTreeMap<String, String> {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/platform/platform-configmap.yaml");
    let text = std::fs::read_to_string(&path).expect("read the platform ConfigMap");
    let mut out = BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).expect("ConfigMap YAML");
        if v["metadata"]["name"] != "outbox-relay-config" {
            continue;
        }
        if let Some(data) = v["data"].as_mapping() {
            for (k, v) in data {
                let (Some(k), Some(v)) = (k.as_str(), v.as_str()) else {
                    continue;
                };
                let key = k.trim_start_matches("outbox_");
                let keep =
                    !key.contains("__") || key == "kafka__properties__queue_buffering_max_kbytes";
                if keep {
                    out.insert(key.to_string(), v.to_string());
                }
            }
        }
    }
    assert!(
        out.contains_key("batch_size"),
        "no outbox_batch_size in {}",
        path.display()
    );
    out
}

/// How a relay contender is configured.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// The platform: built-in defaults and the ConfigMap's values.
    Shipped,
    /// The same, polling every 10 ms and never waiting on the lock (contender 2).
    Polling10ms,
}

struct Bench {
    pg: PgServer,
    broker: std::sync::Mutex<MockBroker>,
    bootstrap: String,
    dir: tempfile::TempDir,
    t0: Instant,
    configmap: BTreeMap<String, String>,
}

impl Bench {
    fn url(&self, db: &str) -> String {
        self.pg.url(db)
    }

    /// The relay's configuration file for `shape`, listening on `port`.
    fn config(&self, shape: Shape, port: u16) -> PathBuf {
        let mut t = toml::Table::new();
        for (k, v) in &self.configmap {
            if let Some(prop) = k.strip_prefix("kafka__properties__") {
                let mut props = toml::Table::new();
                props.insert(prop.replace('_', "."), Value::String(v.clone()));
                let mut kafka = toml::Table::new();
                kafka.insert("properties".into(), Value::Table(props));
                t.insert("kafka".into(), Value::Table(kafka));
            } else {
                t.insert(k.clone(), Value::String(v.clone()));
            }
        }
        if shape == Shape::Polling10ms {
            t.insert("process_interval".into(), "10ms".into());
            t.insert("wakeup".into(), "poll".into());
        }
        let kafka = t
            .entry("kafka")
            .or_insert_with(|| Value::Table(toml::Table::new()));
        if let Value::Table(k) = kafka {
            k.insert("brokers".into(), Value::String(self.bootstrap.clone()));
        }
        let mut http = toml::Table::new();
        http.insert("listen".into(), Value::String(format!("127.0.0.1:{port}")));
        t.insert("http".into(), Value::Table(http));
        let mut log = toml::Table::new();
        log.insert("format".into(), "json".into());
        t.insert("log".into(), Value::Table(log));
        let sources = SOURCES
            .iter()
            .map(|(db, schema, topic)| {
                let mut s = toml::Table::new();
                s.insert("name".into(), Value::String(schema.replace('_', "-")));
                s.insert("schema".into(), Value::String(schema.to_string()));
                s.insert("topic".into(), Value::String(topic.to_string()));
                s.insert("database_url".into(), Value::String(self.url(db)));
                Value::Table(s)
            })
            .collect();
        t.insert("sources".into(), Value::Array(sources));
        let name = match shape {
            Shape::Shipped => "shipped",
            Shape::Polling10ms => "poll10ms",
        };
        let path = self.dir.path().join(format!("{name}-{port}.toml"));
        std::fs::write(&path, toml::to_string(&t).expect("render config")).expect("write config");
        path
    }

    /// Starts a relay shaped `shape` and waits until it leads every source.
    async fn relay(&self, shape: Shape) -> (RelayProcess, u16) {
        let port = free_port();
        let config = self.config(shape, port);
        let log = self.dir.path().join(format!("relay-{port}.log"));
        let mut relay = RelayProcess::start(&config, &log, port, None);
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            relay.assert_running();
            let led = common::http::get_blocking(([127, 0, 0, 1], port).into(), "/metrics")
                .map(|(_, b)| {
                    Metrics::parse(&b)
                        .value("outbox_source_leader", &[("source", "customer")])
                        .unwrap_or(0.0)
                })
                .unwrap_or(0.0);
            if led == 1.0 {
                return (relay, port);
            }
            assert!(Instant::now() < end, "the relay did not lead within 60 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The contenders of the writer-cost run.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Writers {
    Plain,
    Polling,
    Shipped,
}

impl Writers {
    fn label(self) -> &'static str {
        match self {
            Writers::Plain => "(1) identical table, no trigger, nothing reading it",
            Writers::Polling => {
                "(2) relay's table, user triggers disabled, relay polling every 10 ms"
            }
            Writers::Shipped => "(3) relay's table and relay as shipped",
        }
    }
}

/// One pgbench run: transactions per second and mean latency (ms).
fn pgbench(pg: &PgServer, db: &str, script: &Path, clients: u32, secs: u64) -> (f64, f64) {
    let out = Command::new(pgbench_bin())
        .args([
            "-n",
            "-M",
            "prepared",
            "-j",
            "2",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .args(["-p", &pg.port.to_string()])
        .args(["-c", &clients.to_string(), "-T", &secs.to_string()])
        .arg("-f")
        .arg(script)
        .arg(db)
        .output()
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let num = |prefix: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench's output:\n{text}"))
    };
    (num("tps = "), num("latency average = "))
}

fn pgbench_bin() -> PathBuf {
    if let Ok(p) = which("pgbench") {
        return p;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("pgbench (the PostgreSQL server package's tools)")
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.exists())
        })
        .ok_or(())
}

async fn run(o: &Opts, t0: Instant) -> String {
    progress!(t0, "starting PostgreSQL (fsync on) and the mock broker");
    let pg = tokio::task::spawn_blocking(|| {
        let pg = PgServer::start();
        pg.psql(
            "postgres",
            "ALTER SYSTEM SET fsync = on; ALTER SYSTEM SET shared_buffers = '256MB'; \
             ALTER SYSTEM SET max_wal_size = '4GB'",
        );
        pg.restart();
        pg
    })
    .await
    .expect("start PostgreSQL");
    for db in ["platform", "catalog"] {
        pg.create_database(db);
    }
    let mut broker = MockBroker::start();
    for (_, _, topic) in SOURCES {
        broker.create_topic(topic, 1);
    }
    let b = Bench {
        bootstrap: broker.bootstrap(),
        broker: std::sync::Mutex::new(broker),
        pg,
        dir: tempfile::tempdir().expect("scratch directory"),
        t0,
        configmap: configmap_settings(),
    };
    let migrate_config = b.config(Shape::Shipped, free_port());
    relay_process::migrate(&migrate_config, &b.dir.path().join("migrate.log"));
    b.pg.psql(
        "platform",
        "CREATE SCHEMA plain; CREATE TABLE plain.outbox (LIKE customer.outbox INCLUDING ALL); \
         CREATE SCHEMA floor; CREATE TABLE floor.outbox (LIKE customer.outbox INCLUDING ALL)",
    );
    let script = |schema: &str| -> PathBuf {
        let p = b.dir.path().join(format!("{schema}.sql"));
        std::fs::write(
            &p,
            format!(
                "\\set aid random(1, 100000)\n\
                 INSERT INTO {schema}.outbox (aggregate_type, aggregate_id, event_type, payload) \
                 VALUES ('customer', :aid, 'CustomerUpdated', \
                 '{{\"id\": 42, \"email\": \"ada@example.com\", \"name\": \"Ada Lovelace\"}}');\n"
            ),
        )
        .expect("write the pgbench script");
        p
    };
    let (plain_script, outbox_script) = (script("plain"), script("customer"));

    // 1. Writer cost, interleaved rounds.
    let mut runs: BTreeMap<(u32, Writers), Vec<(f64, f64)>> = BTreeMap::new();
    let order = [Writers::Plain, Writers::Polling, Writers::Shipped];
    for round in 0..o.rounds {
        for &clients in &o.clients {
            for k in 0..order.len() {
                let w = order[(k + round) % order.len()];
                b.pg.psql("platform", "TRUNCATE plain.outbox");
                let relay = match w {
                    Writers::Plain => None,
                    Writers::Polling => {
                        b.pg.psql(
                            "platform",
                            "ALTER TABLE customer.outbox DISABLE TRIGGER USER",
                        );
                        Some(b.relay(Shape::Polling10ms).await)
                    }
                    Writers::Shipped => {
                        b.pg.psql(
                            "platform",
                            "ALTER TABLE customer.outbox ENABLE TRIGGER USER",
                        );
                        Some(b.relay(Shape::Shipped).await)
                    }
                };
                let script = if w == Writers::Plain {
                    plain_script.clone()
                } else {
                    outbox_script.clone()
                };
                let (pg, secs) = (&b.pg, o.secs);
                let (tps, latency) =
                    tokio::task::block_in_place(|| pgbench(pg, "platform", &script, clients, secs));
                progress!(
                    t0,
                    "round {} {clients} clients {:?}: {tps:.0} tps, {latency:.3} ms",
                    round + 1,
                    w
                );
                runs.entry((clients, w)).or_default().push((tps, latency));
                if let Some((r, _)) = relay {
                    // Whatever the writers left is drained before the next contender.
                    let admin = workload::connect(&b.url("platform")).await;
                    let end = Instant::now() + Duration::from_secs(120);
                    while workload::pending(&admin, "customer").await > 0 && Instant::now() < end {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    r.stop();
                }
            }
        }
    }
    b.pg.psql(
        "platform",
        "ALTER TABLE customer.outbox ENABLE TRIGGER USER",
    );

    // 2. The relay as shipped, with the platform's settings.
    let (relay, port) = b.relay(Shape::Shipped).await;
    let writer = workload::connect(&b.url("platform")).await;
    let fast = latency_run(&b, &writer, &relay, "rate1000", 1000.0, o.latency_secs).await;
    let slow = latency_run(&b, &writer, &relay, "rate5", 5.0, o.slow_secs).await;
    progress!(t0, "idle for {} s", o.idle_secs);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = proc_stats(relay.pid()).cpu;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.idle_secs)).await;
    let idle_pct = 100.0
        * proc_stats(relay.pid())
            .cpu
            .saturating_sub(before)
            .as_secs_f64()
        / started.elapsed().as_secs_f64();
    let mut drains = Vec::new();
    for round in 0..o.drain_rounds {
        let floor = floor_run(&writer, o.backlog).await;
        let topic = format!("drain.r{round}");
        // librdkafka's mock cluster keeps 5 MiB per partition, dropping the oldest
        // records beyond that: enough partitions that the whole backlog stays.
        b.broker
            .lock()
            .unwrap()
            .create_topic(&topic, DRAIN_PARTITIONS);
        let relay_rate = drain_run(&b, &writer, &topic, o.backlog).await;
        progress!(
            t0,
            "drain round {}: floor {floor:.0}/s, relay {relay_rate:.0}/s ({:.2})",
            round + 1,
            relay_rate / floor
        );
        drains.push((floor, relay_rate));
    }
    let peak_rss = proc_stats(relay.pid()).peak_rss_kib as f64 / 1024.0;
    let _ = port;
    relay.stop();

    render(o, &b, &runs, &fast, &slow, idle_pct, &drains, peak_rss)
}

/// What a latency run measured.
struct Latency {
    rate: f64,
    events: usize,
    p50: f64,
    p99: f64,
    missing: u64,
    cpu_pct: f64,
    cpu_us_per_event: f64,
}

/// One-row transactions into customer's outbox at `rate` for `secs` (after a second
/// of warm-up), each row for topic `topic` with its `bench_seq` header; commit (the
/// send time is taken before the INSERT) to consumer, and the relay's CPU meanwhile.
async fn latency_run(
    b: &Bench,
    writer: &tokio_postgres::Client,
    relay: &RelayProcess,
    topic: &str,
    rate: f64,
    secs: f64,
) -> Latency {
    progress!(b.t0, "latency at {rate}/s for {secs} s");
    b.broker.lock().unwrap().create_topic(topic, 1);
    let warm = rate.max(1.0) as u64;
    let total = warm + (rate * secs) as u64;
    let book = Arc::new(LatencyBook::new(total));
    let consumer = CountingConsumer::start(&b.bootstrap, topic, 1, total, Some(book.clone()), 1);
    let insert = writer
        .prepare(
            "INSERT INTO customer.outbox (aggregate_type, aggregate_id, event_type, payload, headers, topic) \
             VALUES ('customer', $1, 'CustomerUpdated', '{\"id\": 42}', $2::text::jsonb, $3)",
        )
        .await
        .expect("prepare the writer's insert");
    let start = Instant::now();
    let mut cpu_from = None;
    for seq in 0..total {
        let due = start + Duration::from_secs_f64(seq as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        if seq == warm {
            cpu_from = Some((Instant::now(), proc_stats(relay.pid()).cpu));
        }
        let key = format!("customer-{}", seq % 997);
        let headers = format!("{{\"bench_seq\": \"{seq}\"}}");
        book.mark_sent(seq, Instant::now());
        writer
            .execute(&insert, &[&key, &headers, &topic])
            .await
            .expect("writer insert");
    }
    consumer.wait_target(Duration::from_secs(30)).await;
    let (from_at, from_cpu) = cpu_from.unwrap_or((start, Duration::ZERO));
    // CPU until the last record arrived, over the measured window.
    let wall = from_at.elapsed().as_secs_f64();
    let cpu = proc_stats(relay.pid())
        .cpu
        .saturating_sub(from_cpu)
        .as_secs_f64();
    let (lat, missing) = book.latencies_ms(warm..total);
    let events = lat.len();
    Latency {
        rate,
        events,
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        missing,
        cpu_pct: 100.0 * cpu / wall,
        cpu_us_per_event: 1e6 * cpu / (total - warm).max(1) as f64,
    }
}

/// The one-statement floor: `n` rows loaded into floor.outbox, then deleted and read
/// back in one `DELETE ... RETURNING *`: rows per second.
async fn floor_run(client: &tokio_postgres::Client, n: u64) -> f64 {
    client
        .batch_execute(&format!(
            "INSERT INTO floor.outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', 'order-' || (i % 1000), 'OrderChanged', \
                    jsonb_build_object('i', i, 'note', repeat('x', 200)) \
             FROM generate_series(1, {n}) AS i"
        ))
        .await
        .expect("load the floor's backlog");
    client
        .batch_execute("VACUUM ANALYZE floor.outbox")
        .await
        .expect("vacuum the floor's backlog");
    let started = Instant::now();
    let rows = client
        .query("DELETE FROM floor.outbox RETURNING *", &[])
        .await
        .expect("the floor's delete");
    let took = started.elapsed().as_secs_f64();
    assert_eq!(rows.len() as u64, n);
    n as f64 / took
}

/// The relay drains `n` rows committed in one transaction into product's outbox (for
/// `topic`): rows per second from the commit to the consumer holding them all. Not
/// customer's: the writers' runs put more than a million rows through that table, and
/// its bloat would be measured against the floor's fresh one.
async fn drain_run(b: &Bench, client: &tokio_postgres::Client, topic: &str, n: u64) -> f64 {
    let consumer = CountingConsumer::start(
        &b.bootstrap,
        topic,
        DRAIN_PARTITIONS,
        n,
        None,
        DRAIN_FETCH_WAIT_MS,
    );
    client
        .batch_execute(&format!(
            "INSERT INTO product.outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
             SELECT 'order', 'order-' || (i % 1000), 'OrderChanged', \
                    jsonb_build_object('i', i, 'note', repeat('x', 200)), '{topic}' \
             FROM generate_series(1, {n}) AS i"
        ))
        .await
        .expect("load the relay's backlog");
    let committed = Instant::now();
    let Some(reached) = consumer.wait_target(Duration::from_secs(120)).await else {
        let left = workload::pending(client, "product").await;
        let log = std::fs::read_dir(b.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("relay-"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .last()
            .unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let (bootstrap, t) = (b.bootstrap.clone(), topic.to_string());
        let again = tokio::task::spawn_blocking(move || {
            common::consume(&bootstrap, &t, n as usize, Duration::from_secs(20)).len()
        })
        .await
        .unwrap_or(0);
        let dead = workload::connect(&b.url("platform"))
            .await
            .query_one("SELECT count(*) FROM product.outbox_dead_letter", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(-1);
        panic!(
            "the backlog did not drain within 120 s: {} of {n} at the consumer ({again} read again from the start), {left} rows left, {dead} dead-lettered; relay log tail:\n{}",
            consumer.count(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    };
    n as f64 / reached.duration_since(committed).as_secs_f64()
}

#[allow(clippy::too_many_arguments)]
fn render(
    o: &Opts,
    b: &Bench,
    runs: &BTreeMap<(u32, Writers), Vec<(f64, f64)>>,
    fast: &Latency,
    slow: &Latency,
    idle_pct: f64,
    drains: &[(f64, f64)],
    peak_rss: f64,
) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let server = b.pg.psql(
        "postgres",
        "SELECT current_setting('server_version') || ', fsync=' || current_setting('fsync') || \
         ', synchronous_commit=' || current_setting('synchronous_commit')",
    );
    let _ = writeln!(s, "# outbox-relay writer-cost bench\n");
    let _ = writeln!(
        s,
        "PostgreSQL {server}; {} CPUs; librdkafka's mock cluster. The relay: built-in defaults with the platform ConfigMap's values ({}).\n",
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        b.configmap
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "Writers: pgbench, one-row INSERT transactions, {} s runs, {} interleaved rounds, medians (each round's figures in brackets).\n",
        o.secs, o.rounds
    );
    let _ = writeln!(
        s,
        "| clients | contender | tps | commit latency, ms | tps against (2) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|");
    let mut checks = Vec::new();
    for &clients in &o.clients {
        let med = |w: Writers| -> (f64, f64, String) {
            let r = runs.get(&(clients, w)).cloned().unwrap_or_default();
            let each: Vec<String> = r.iter().map(|(t, _)| format!("{t:.0}")).collect();
            (
                median(r.iter().map(|x| x.0).collect()),
                median(r.iter().map(|x| x.1).collect()),
                each.join(", "),
            )
        };
        let polling = med(Writers::Polling).0;
        for w in [Writers::Plain, Writers::Polling, Writers::Shipped] {
            let (tps, lat, each) = med(w);
            let _ = writeln!(
                s,
                "| {clients} | {} | {tps:.0} [{each}] | {lat:.2} | {:.2} |",
                w.label(),
                tps / polling
            );
        }
        let shipped = med(Writers::Shipped).0;
        checks.push((
            format!(
                "writers' TPS with the relay as shipped at least 0.9 of (2), {clients} clients"
            ),
            shipped / polling >= 0.9,
            format!("{:.2}", shipped / polling),
        ));
    }
    let _ = writeln!(
        s,
        "\nThe relay as shipped, commit to consumer (the send time taken before each one-row INSERT; the consumer's fetch.wait.max.ms is 1):\n"
    );
    let _ = writeln!(
        s,
        "| rate | events | p50 | p99 | missing | relay CPU | relay CPU per event |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for l in [fast, slow] {
        let _ = writeln!(
            s,
            "| {}/s | {} | {:.2} ms | {:.2} ms | {} | {:.2}% of a core | {:.0} µs |",
            l.rate, l.events, l.p50, l.p99, l.missing, l.cpu_pct, l.cpu_us_per_event
        );
    }
    let _ = writeln!(s, "\nIdle ({} s): relay CPU {idle_pct:.3}% of a core; peak RSS over the whole run {peak_rss:.1} MiB.\n", o.idle_secs);
    let _ = writeln!(
        s,
        "A backlog of {} events committed at once into product's outbox, drained, against the one-statement floor (`DELETE ... RETURNING *` of the same backlog, read by the client, from a table like it):\n",
        o.backlog
    );
    let _ = writeln!(s, "| round | floor, events/s | relay, events/s | ratio |");
    let _ = writeln!(s, "|---|---|---|---|");
    for (i, (f, r)) in drains.iter().enumerate() {
        let _ = writeln!(s, "| {} | {f:.0} | {r:.0} | {:.2} |", i + 1, r / f);
    }
    let ratio = median(drains.iter().map(|(f, r)| r / f).collect());
    checks.push((
        "p99 commit to Kafka at most 15 ms at 1,000/s".into(),
        fast.p99 <= 15.0 && fast.missing == 0,
        format!("{:.2} ms", fast.p99),
    ));
    checks.push((
        "p99 commit to Kafka at most 15 ms at 5/s".into(),
        slow.p99 <= 15.0 && slow.missing == 0,
        format!("{:.2} ms", slow.p99),
    ));
    checks.push((
        "a backlog drains at 0.5 or more of the one-statement floor (median)".into(),
        ratio >= 0.5,
        format!("{ratio:.2}"),
    ));
    checks.push((
        "at most 5% of a core at 1,000 events/s".into(),
        fast.cpu_pct <= 5.0,
        format!("{:.2}%", fast.cpu_pct),
    ));
    checks.push((
        "at most 0.3% of a core idle".into(),
        idle_pct <= 0.3,
        format!("{idle_pct:.3}%"),
    ));
    let _ = writeln!(s, "\nTARGETS (issue 15):");
    for (what, ok, figure) in checks {
        let _ = writeln!(
            s,
            "- {what}: {figure}, {}",
            if ok { "met" } else { "NOT MET" }
        );
    }
    s
}
