//! `cargo bench --bench relay`: how fast the relay empties a backlog and how soon a
//! committed event reaches a consumer, against limits measured in the same run on the
//! same PostgreSQL and broker. See benches/README.md for how to run and read it.
//!
//! One run starts a private PostgreSQL cluster and a tansu broker (tests/common), then:
//! 1. limits: the backlog drained by the relay's claim and delete statements alone (no
//!    Kafka), and the broker fed by a producer with the relay's settings (no PostgreSQL);
//! 2. drain: the release relay binary empties the backlog, measured at a consumer, with
//!    a throughput batch size and with the plan's default;
//! 3. a naive row-at-a-time relay;
//! 4. latency from commit to consumer at steady rates (wake-up by NOTIFY only), on tansu
//!    and on librdkafka's mock cluster in its own process (see mock_broker.rs);
//! 5. the relay's peak RSS and CPU, and, with BENCH_BIG, a large backlog's peak RSS.

#[path = "../../tests/common/mod.rs"]
mod common;
mod cpu;
mod kafka;
mod mock_broker;
mod relay_process;
mod report;
mod workload;
// `runs` uses the `progress!` macro, so it is declared after it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{create_topic, free_port, Broker, PgServer};
use mock_broker::MockBroker;
use relay_process::{config_toml, migrate, shipped_int, Overrides};
use report::{machine, thousands, DrainRow, Report};
use tokio_postgres::Client;
use workload::AGGREGATES;

/// Options, from BENCH_* environment variables.
#[derive(Debug, Clone)]
struct Opts {
    /// Backlog size of the drain runs (BENCH_EVENTS).
    events: u64,
    /// Backlog size of the memory run; none: no memory run (BENCH_BIG).
    big: Option<u64>,
    /// Partitions of the drain runs' topics (BENCH_PARTITIONS).
    partitions: i32,
    /// Partitions of the latency runs' topics (BENCH_LATENCY_PARTITIONS): tansu's cost
    /// per request grows with partitions and stored batches, and at 6 partitions and a
    /// few hundred small produce requests a second it takes most of a core.
    latency_partitions: i32,
    /// Claim and delete batch of the throughput runs (BENCH_BATCH).
    batch: i64,
    /// Rounds of the throughput pair, SQL-only limit then relay, interleaved
    /// (BENCH_ROUNDS): the target is judged on the median of the rounds' ratios, so one
    /// slow moment of a shared machine does not decide it.
    rounds: u32,
    /// Steady rates of the latency runs (BENCH_RATES, comma-separated).
    rates: Vec<u64>,
    /// Measured seconds of each latency run, after one second of warm-up (BENCH_LATENCY_SECS).
    latency_secs: f64,
    /// Cap of the naive relay's run (BENCH_NAIVE_SECS).
    naive_secs: f64,
    /// Cap of every drain (BENCH_DRAIN_SECS); a drain still running is reported as partial.
    drain_secs: f64,
    /// PostgreSQL fsync (BENCH_FSYNC=on|off).
    fsync: bool,
    /// Brokers of the latency runs (BENCH_LATENCY_BROKERS, comma-separated: tansu,mock).
    latency_brokers: Vec<BrokerKind>,
    /// Sections to run (BENCH_ONLY, comma-separated: broker,sql,relay,naive,latency,big).
    only: Option<Vec<String>>,
    /// Profile the throughput drain with `perf record -a` (BENCH_PERF=1).
    perf: bool,
    /// A second relay binary (BENCH_RELAY_BIN_B), say an older build: every throughput
    /// round also drains with it, right after the relay under test, against the same
    /// round's limit.
    relay_bin_b: Option<PathBuf>,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        _ => default,
    }
}

impl Opts {
    fn from_env() -> Opts {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        let rates = std::env::var("BENCH_RATES")
            .unwrap_or_else(|_| "1000,10000".into())
            .split(',')
            .map(|r| {
                r.trim()
                    .replace('_', "")
                    .parse()
                    .expect("BENCH_RATES: numbers")
            })
            .collect();
        Opts {
            events: env_num("BENCH_EVENTS", if quick { 10_000 } else { 100_000 }),
            big: std::env::var("BENCH_BIG")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|_| env_num("BENCH_BIG", 1_000_000u64)),
            partitions: env_num("BENCH_PARTITIONS", 6),
            latency_partitions: env_num("BENCH_LATENCY_PARTITIONS", 1),
            batch: env_num("BENCH_BATCH", 1000),
            rounds: env_num("BENCH_ROUNDS", if quick { 1 } else { 5 }).max(1),
            rates,
            latency_brokers: std::env::var("BENCH_LATENCY_BROKERS")
                .unwrap_or_else(|_| "tansu,mock".into())
                .split(',')
                .map(|b| match b.trim() {
                    "tansu" => BrokerKind::Tansu,
                    "mock" => BrokerKind::Mock,
                    other => panic!("BENCH_LATENCY_BROKERS: {other:?} is neither tansu nor mock"),
                })
                .collect(),
            latency_secs: env_num("BENCH_LATENCY_SECS", if quick { 3.0 } else { 10.0 }),
            naive_secs: env_num("BENCH_NAIVE_SECS", if quick { 5.0 } else { 20.0 }),
            drain_secs: env_num("BENCH_DRAIN_SECS", if quick { 20.0 } else { 60.0 }),
            fsync: std::env::var("BENCH_FSYNC").is_ok_and(|v| v == "on" || v == "1"),
            only: std::env::var("BENCH_ONLY")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.split(',').map(|s| s.trim().to_string()).collect()),
            perf: std::env::var("BENCH_PERF").is_ok_and(|v| !v.is_empty() && v != "0"),
            relay_bin_b: std::env::var_os("BENCH_RELAY_BIN_B")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .inspect(|p| {
                    assert!(
                        p.is_file(),
                        "BENCH_RELAY_BIN_B={}: no such file",
                        p.display()
                    )
                }),
        }
    }

    fn runs(&self, section: &str) -> bool {
        match &self.only {
            Some(only) => only.iter().any(|s| s == section),
            None => section != "big" || self.big.is_some(),
        }
    }
}

/// The broker a lane's topic lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BrokerKind {
    /// The tansu process every section uses.
    Tansu,
    /// librdkafka's mock cluster in its own process (latency runs only).
    Mock,
}

impl BrokerKind {
    /// The name in report labels.
    fn name(self) -> &'static str {
        match self {
            BrokerKind::Tansu => "tansu",
            BrokerKind::Mock => "librdkafka mock cluster",
        }
    }

    /// The latency consumer's `fetch.wait.max.ms`. Neither broker answers a fetch on an
    /// empty partition before this wait is over, even when records arrive meanwhile
    /// (librdkafka's rdkafka_mock_handlers.c says so of the mock), so it adds up to this
    /// much to every latency, the relay's and the broker alone's alike. 5 ms on tansu,
    /// where shorter waits cost a CPU the relay then lacks; 1 ms on the mock, which
    /// answers a fetch for little CPU, so its floor comes near a real broker's (which
    /// answers as soon as records arrive) without the consumer spinning, as it would at 0.
    fn fetch_wait_ms(self) -> u32 {
        match self {
            BrokerKind::Tansu => 5,
            BrokerKind::Mock => 1,
        }
    }
}

/// Prints a progress line to stderr with the time since the bench started.
macro_rules! progress {
    ($t0:expr, $($arg:tt)*) => {
        eprintln!("[{:>6.1}s] {}", $t0.elapsed().as_secs_f64(), format!($($arg)*))
    };
}

mod runs;

/// What every section shares.
struct Bench {
    opts: Opts,
    t0: Instant,
    pg: PgServer,
    broker: Broker,
    /// The mock broker process of the current mock lane, if any.
    mock: Option<MockBroker>,
    db_url: String,
    admin: Client,
    dir: tempfile::TempDir,
    runs: u32,
    template_rows: u64,
    procs: cpu::Procs,
    /// CPU seconds other processes used during measured windows, and those windows' capacity.
    other_cpu: (f64, f64),
    report: Report,
}

/// One contender's schema, topic and relay configuration.
struct Lane {
    schema: String,
    topic: String,
    bootstrap: String,
    config: PathBuf,
    config_text: String,
    http_port: u16,
    partitions: i32,
}

impl Bench {
    /// A fresh schema (migrated by `outbox-relay migrate`) and topic for one contender,
    /// on a freshly started, empty tansu: its memory storage slows down as the records of
    /// earlier contenders pile up, so every contender starts from the same empty broker.
    async fn lane(&mut self, name: &str, o: &Overrides, partitions: i32) -> Lane {
        self.lane_on(BrokerKind::Tansu, name, o, partitions).await
    }

    /// [`Bench::lane`] on the given broker; a mock lane gets a fresh mock broker process.
    async fn lane_on(
        &mut self,
        broker: BrokerKind,
        name: &str,
        o: &Overrides,
        partitions: i32,
    ) -> Lane {
        if broker == BrokerKind::Tansu && self.runs > 0 {
            self.broker.restart();
            self.procs.tansu = cpu::tansu_pid(self.broker.port);
        }
        self.mock = None; // the previous mock lane's process, if any
        self.runs += 1;
        let schema = format!("b{}_{name}", self.runs);
        let topic = format!("{schema}.events");
        let bootstrap = match broker {
            BrokerKind::Tansu => self.broker.bootstrap(),
            BrokerKind::Mock => {
                let t = topic.clone();
                let mock = tokio::task::spawn_blocking(move || {
                    let mut mock = MockBroker::start();
                    mock.create_topic(&t, partitions);
                    mock
                })
                .await
                .expect("start the mock broker");
                self.procs.mock = Some(mock.pid());
                let bootstrap = mock.bootstrap();
                self.mock = Some(mock);
                bootstrap
            }
        };
        let http_port = free_port();
        let config_text = config_toml(
            o,
            &schema.replace('_', "-"),
            &schema,
            &topic,
            &self.db_url,
            &bootstrap,
            http_port,
        );
        let config = self.dir.path().join(format!("{schema}.toml"));
        std::fs::write(&config, &config_text).expect("write config");
        let log = self.dir.path().join(format!("{schema}.migrate.log"));
        let (b, t, c) = (bootstrap.clone(), topic.clone(), config.clone());
        tokio::task::spawn_blocking(move || {
            if broker == BrokerKind::Tansu {
                create_topic(&b, &t, partitions);
            }
            migrate(&c, &log);
        })
        .await
        .expect("create topic and migrate");
        Lane {
            schema,
            topic,
            bootstrap,
            config,
            config_text,
            http_port,
            partitions,
        }
    }

    async fn drop_lane(&self, lane: &Lane) {
        self.admin
            .batch_execute(&format!(
                "/* bench */ DROP SCHEMA \"{}\" CASCADE",
                lane.schema
            ))
            .await
            .expect("drop schema");
    }

    /// Makes sure the template holds at least `n` rows.
    async fn ensure_template(&mut self, n: u64) {
        const CHUNK: u64 = 250_000;
        while self.template_rows < n {
            let from = self.template_rows + 1;
            let to = (self.template_rows + CHUNK).min(n);
            progress!(
                self.t0,
                "generating template events {}..{}",
                thousands(from),
                thousands(to)
            );
            workload::generate_template(&self.admin, from, to).await;
            self.template_rows = to;
        }
        self.admin
            .batch_execute("VACUUM (ANALYZE) bench_data.events")
            .await
            .expect("vacuum template");
    }

    /// The CPU split of a measured window, noting what processes outside the bench used.
    fn cpu_split(&mut self, a: &cpu::Sample, z: &cpu::Sample) -> String {
        let (other, capacity) = cpu::others(a, z);
        self.other_cpu.0 += other;
        self.other_cpu.1 += capacity;
        cpu::split(a, z)
    }

    async fn reset_statements(&self) {
        self.admin
            .batch_execute("/* bench */ SELECT pg_stat_statements_reset()")
            .await
            .expect("reset pg_stat_statements");
    }

    /// The statements PostgreSQL spent most time on since the last reset, as report lines.
    async fn top_statements(&self, title: &str, wall: Duration) -> Vec<String> {
        let rows = self
            .admin
            .query(
                "/* bench */ SELECT calls, total_exec_time, mean_exec_time, rows,
                        left(regexp_replace(query, '\\s+', ' ', 'g'), 72)
                 FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND query NOT LIKE '%bench */%'
                 ORDER BY total_exec_time DESC",
                &[],
            )
            .await
            .expect("read pg_stat_statements");
        let total_ms: f64 = rows.iter().map(|r| r.get::<_, f64>(1)).sum();
        let mut lines = vec![format!(
            "{title}: wall {:.2} s, PostgreSQL executing statements {:.2} s ({:.0}%)",
            wall.as_secs_f64(),
            total_ms / 1e3,
            100.0 * total_ms / 1e3 / wall.as_secs_f64().max(1e-9)
        )];
        for r in rows.iter().take(4) {
            let calls: i64 = r.get(0);
            let total: f64 = r.get(1);
            let mean: f64 = r.get(2);
            let nrows: i64 = r.get(3);
            let q: String = r.get(4);
            lines.push(format!(
                "    {:>8} calls {:>9.0} ms total {:>8.3} ms mean {:>9} rows  {q}",
                thousands(calls as u64),
                total,
                mean,
                thousands(nrows as u64)
            ));
        }
        lines
    }
}

fn main() {
    if mock_broker::serve_if_child() {
        return;
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not, and this is no test.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!(
            "benches/relay: a benchmark, not a test; run it with `cargo bench --bench relay`"
        );
        return;
    }
    let opts = Opts::from_env();
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = rt.block_on(run(opts, t0));
    println!("{}", report.render());
    eprintln!("benches/relay: done in {:.0} s", t0.elapsed().as_secs_f64());
}

async fn run(opts: Opts, t0: Instant) -> Report {
    let load = tokio::task::spawn_blocking(|| cpu::machine_load(Duration::from_secs(1)))
        .await
        .expect("measure machine load");
    if load > 0.2 {
        progress!(
            t0,
            "warning: {:.0}% of the CPUs are busy before the bench started anything",
            100.0 * load
        );
    }
    progress!(t0, "starting PostgreSQL and tansu");
    let pg = tokio::task::spawn_blocking(PgServer::start)
        .await
        .expect("start PostgreSQL");
    pg.psql(
        "postgres",
        &format!(
            "ALTER SYSTEM SET shared_buffers = '256MB';
             ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';
             ALTER SYSTEM SET fsync = {};
             ALTER SYSTEM SET max_wal_size = '4GB';",
            if opts.fsync { "on" } else { "off" }
        ),
    );
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart();
        pg
    })
    .await
    .expect("restart PostgreSQL");
    pg.create_database("bench");
    pg.psql("bench", "CREATE EXTENSION pg_stat_statements");
    let settings = pg.psql(
        "bench",
        "SELECT current_setting('server_version') || ', fsync=' || current_setting('fsync') || \
         ', synchronous_commit=' || current_setting('synchronous_commit') || \
         ', shared_buffers=' || current_setting('shared_buffers')",
    );
    let data_fs = std::process::Command::new("df")
        .args(["-PT"])
        .arg(pg.data_dir())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let l = text.lines().nth(1)?.to_string();
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(format!("{} on {}", f.get(1)?, f.get(6)?))
        })
        .unwrap_or_else(|| "unknown".into());
    let broker = tokio::task::spawn_blocking(Broker::start)
        .await
        .expect("start tansu");
    let db_url = pg.url("bench");
    let admin = workload::connect(&db_url).await;
    let procs = cpu::Procs {
        postmaster: cpu::postmaster_pid(pg.data_dir()),
        tansu: cpu::tansu_pid(broker.port),
        mock: None,
    };
    let mut b = Bench {
        procs,
        other_cpu: (0.0, 0.0),
        t0,
        admin,
        db_url,
        pg,
        broker,
        mock: None,
        dir: tempfile::Builder::new()
            .prefix("outbox-relay-bench-")
            .tempdir()
            .expect("temp dir"),
        runs: 0,
        template_rows: 0,
        report: Report::default(),
        opts,
    };
    b.ensure_template(b.opts.events.max(10_000)).await;
    let (payload, headers, aggregates) = workload::template_shape(&b.admin).await;
    let tansu = b
        .procs
        .tansu
        .and_then(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
        .and_then(|exe| {
            std::process::Command::new(exe)
                .arg("--version")
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "tansu".into());
    let shipped = (shipped_int("batch_size"), shipped_int("delete_batch_size"));
    b.report.header = vec![
        format!(
            "outbox-relay benchmark: backlog {} events (payload avg {payload:.0} B JSON, {aggregates} aggregates of {AGGREGATES}, avg {headers:.1} row headers + 4 relay headers), topics of {} partitions ({} for latency runs)",
            thousands(b.opts.events),
            b.opts.partitions,
            b.opts.latency_partitions
        ),
        format!("machine: {}", machine()),
        format!("PostgreSQL {settings}, data dir {data_fs}; the same server for every contender"),
        format!(
            "broker: {tansu} (memory storage), 127.0.0.1, restarted empty for every contender; producer: the relay's own (sink::Sink with config/default.toml [kafka.properties]); shipped batch_size/delete_batch_size {}/{}",
            shipped.0.map(|v| v.to_string()).unwrap_or("?".into()),
            shipped.1.map(|v| v.to_string()).unwrap_or("?".into())
        ),
    ];
    let passed = relay_process::passed_relay_env();
    if !passed.is_empty() {
        let vars: Vec<String> = passed
            .iter()
            .map(|(k, v)| {
                if ["PASSWORD", "SECRET", "URL"].iter().any(|s| k.contains(s)) {
                    format!("{k}=***")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect();
        b.report.header.push(format!(
            "relay processes also get (BENCH_RELAY_ENV=1; the broker-alone producer does not): {}",
            vars.join(" ")
        ));
    }
    if let Some(bin) = &b.opts.relay_bin_b {
        b.report.header.push(format!(
            "relayB rows: the binary {} (BENCH_RELAY_BIN_B), with the same configuration, right after the relay under test in every throughput round",
            bin.display()
        ));
    }
    if b.opts.runs("latency") && b.opts.latency_brokers.contains(&BrokerKind::Mock) {
        b.report.header.push(format!(
            "[{}] (latency runs): librdkafka's mock cluster (rdkafka MockCluster, in memory, NOT a production broker), 1 broker in its own process on 127.0.0.1, fresh for every contender; there to tell the relay's own latency from tansu's. Latency consumer's fetch.wait.max.ms: {} ms on it, {} ms on tansu (neither answers an empty fetch sooner)",
            BrokerKind::Mock.name(),
            kafka::fetch_wait_ms(BrokerKind::Mock.fetch_wait_ms()),
            kafka::fetch_wait_ms(BrokerKind::Tansu.fetch_wait_ms())
        ));
    }

    let n = b.opts.events;
    let batch = b.opts.batch;
    let drain_cap = Duration::from_secs_f64(b.opts.drain_secs);
    // (label, batch, delete batch): the throughput setting, the plan's default and,
    // if it differs from both, what config/default.toml ships.
    let mut settings_list = vec![
        (format!("batch {batch} / delete {batch}"), batch, batch),
        ("batch 10 / delete 50 (plan default)".to_string(), 10, 50),
    ];
    if let (Some(bs), Some(ds)) = shipped {
        if !settings_list.iter().any(|s| s.1 == bs && s.2 == ds) {
            settings_list.push((
                format!("batch {bs} / delete {ds} (config/default.toml)"),
                bs,
                ds,
            ));
        }
    }

    b.report.throughput_key = Some(format!("relay-{batch}-{batch}"));
    if b.opts.runs("broker") {
        runs::broker_limit(&mut b, n).await;
    }
    // The throughput setting runs in rounds, each a SQL-only limit then the relay, and
    // each relay row is set against its own round's limit. Rounds need both sections.
    let rounds = if b.opts.runs("sql") && b.opts.runs("relay") {
        b.opts.rounds
    } else {
        1
    };
    for (i, (label, bs, ds)) in settings_list.iter().enumerate() {
        let throughput = i == 0;
        let repeat = if throughput { rounds } else { 1 };
        for round in 1..=repeat {
            // Keyed by both batch sizes: BENCH_BATCH=10 must not meet the plan's 10 / 50.
            let (label, key) = if repeat > 1 {
                (
                    format!("{label} [round {round}/{repeat}]"),
                    format!("{bs}-{ds}#{round}"),
                )
            } else {
                (label.clone(), format!("{bs}-{ds}"))
            };
            if b.opts.runs("sql") {
                runs::sql_limit(
                    &mut b,
                    n,
                    &label,
                    &format!("sql-{key}"),
                    *bs,
                    *ds as usize,
                    drain_cap,
                )
                .await;
            }
            if b.opts.runs("relay") {
                // The relay under test, then (throughput rounds only) the second binary.
                let second = b.opts.relay_bin_b.clone().filter(|_| throughput);
                let binaries =
                    std::iter::once(("relay", None)).chain(second.map(|p| ("relayB", Some(p))));
                for (who, binary) in binaries {
                    let profile = b.opts.perf && throughput && round == 1 && who == "relay";
                    let o = Overrides {
                        batch_size: Some(*bs),
                        max_batch_size: throughput.then_some(*bs),
                        delete_batch_size: Some(*ds),
                        binary,
                        ..Overrides::default()
                    };
                    let row = runs::relay_drain(
                        &mut b,
                        n,
                        &format!("{who}, {label}"),
                        &o,
                        drain_cap,
                        &format!("{who}-{key}"),
                        profile,
                    )
                    .await;
                    let limit_key = format!("sql-{key}");
                    let has_limit = b.report.drains.iter().any(|r| r.key == limit_key);
                    b.report.drains.push(DrainRow {
                        limit_key: has_limit.then_some(limit_key),
                        ..row
                    });
                }
            }
        }
    }
    if b.opts.runs("naive") {
        runs::naive(&mut b, n).await;
    }
    if b.opts.runs("latency") {
        for rate in b.opts.rates.clone() {
            for broker in b.opts.latency_brokers.clone() {
                runs::latency(&mut b, broker, rate, true).await;
                runs::latency(&mut b, broker, rate, false).await;
            }
        }
    }
    if b.opts.runs("big") {
        let big = b.opts.big.unwrap_or(1_000_000);
        b.ensure_template(big).await;
        let o = Overrides {
            batch_size: Some(batch),
            max_batch_size: Some(batch),
            delete_batch_size: Some(batch),
            ..Overrides::default()
        };
        let cap = Duration::from_secs_f64(b.opts.drain_secs.max(big as f64 / 2_000.0));
        let row = runs::relay_drain(
            &mut b,
            big,
            &format!("relay, batch {batch} / delete {batch}"),
            &o,
            cap,
            "big",
            false,
        )
        .await;
        b.report.big = Some(row);
    }
    let (other, capacity) = b.other_cpu;
    let share = other / capacity.max(1e-9);
    b.report.header.push(format!(
        "other processes used {:.1}% of the CPUs during the measured windows ({:.0}% before the start){}",
        100.0 * share,
        100.0 * load,
        if share > 0.05 { ": the machine was NOT quiet, the figures are disturbed" } else { "" }
    ));
    progress!(t0, "stopping servers");
    let Bench {
        pg,
        broker,
        admin,
        report,
        dir,
        ..
    } = b;
    drop(admin);
    tokio::task::spawn_blocking(move || {
        drop(broker);
        drop(pg);
        if std::env::var("BENCH_KEEP").is_ok_and(|v| !v.is_empty() && v != "0") {
            eprintln!(
                "benches/relay: kept configs and relay logs in {}",
                dir.keep().display()
            );
        } else {
            drop(dir);
        }
    })
    .await
    .expect("stop servers");
    report
}
