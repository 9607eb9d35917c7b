//! `cargo bench --bench scale`: what a thousand sources and two replicas cost the
//! services' PostgreSQL, how the replicas share, take over and rebalance the sources,
//! and whether a hot source keeps cold ones waiting. See benches/README.md.
//!
//! One run: a private PostgreSQL with `max_connections = 100`; an ordinary role `relay`
//! owning `BENCH_SCALE_SOURCES` tenant schemas `t_0000...` and a schema `hot`;
//! `outbox-relay migrate` (as `relay`) through a `schema_pattern` source; librdkafka's
//! mock cluster in its own process; two relay processes (the release binary, the
//! shipped config/default.toml with its sources replaced by the pattern and `hot`),
//! told apart in `pg_stat_activity` by their `application_name`. Then:
//! 1. start: the time until every source is led, and the split;
//! 2. idle: sessions opened (the server's connection log), CPU and RSS of each replica;
//! 3. kill -9 of one replica: the time until the other leads everything;
//! 4. its restart: the time until it leads 40% again, and the split after;
//! 5. hot and cold: `hot` drains a backlog alone, then again while 100 cold tenants are
//!    written at a steady rate (one-row transactions): the cold events' commit-to-
//!    consumer latency while the hot one drains, and the hot drain against the lone.
//!
//! Peak connections per replica are sampled every 100 ms through all of it.

#![allow(dead_code)] // the relay bench's modules, of which this bench uses a part

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../relay/cpu.rs"]
mod cpu;
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

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, Metrics, PgServer};
use kafka::{CountingConsumer, LatencyBook, DRAIN_FETCH_WAIT_MS};
use mock_broker::MockBroker;
use relay_process::{migrate_within, proc_stats, shipped_config, RelayProcess};
use shared::{env_num, median, percentile, quick};

/// The two replicas' `application_name`s.
const REPLICAS: [&str; 2] = ["relay-a", "relay-b"];

/// Options, from BENCH_* environment variables.
struct Opts {
    /// Tenant schemas (BENCH_SCALE_SOURCES).
    sources: usize,
    /// Measured idle seconds (BENCH_SCALE_IDLE_SECS).
    idle_secs: u64,
    /// Backlog of the hot source (BENCH_SCALE_HOT).
    hot: u64,
    /// Cold tenants written during the hot drain (BENCH_SCALE_COLD).
    cold: usize,
    /// Their events per second, all together (BENCH_SCALE_COLD_RATE).
    cold_rate: f64,
    /// Rounds of the lone and the mixed drain, interleaved (BENCH_SCALE_ROUNDS).
    rounds: u32,
}

impl Opts {
    fn from_env() -> Opts {
        let quick = quick();
        let sources = env_num("BENCH_SCALE_SOURCES", if quick { 100 } else { 1000 });
        Opts {
            sources,
            idle_secs: env_num("BENCH_SCALE_IDLE_SECS", if quick { 10 } else { 60 }),
            hot: env_num("BENCH_SCALE_HOT", if quick { 20_000 } else { 200_000 }),
            cold: env_num("BENCH_SCALE_COLD", 100usize)
                .min(sources.saturating_sub(1))
                .max(1),
            cold_rate: env_num("BENCH_SCALE_COLD_RATE", 250.0),
            rounds: env_num("BENCH_SCALE_ROUNDS", if quick { 1 } else { 5 }),
        }
    }
}

fn main() {
    let opts = Opts::from_env();
    shared::bench_main("scale", |t0| async move { run(&opts, t0).await });
}

/// What a replica process is, and how to ask it.
struct Replica {
    app: &'static str,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    process: Option<RelayProcess>,
}

impl Replica {
    fn start(&mut self) {
        self.process = Some(RelayProcess::start(
            &self.config,
            &self.log,
            self.port,
            None,
        ));
    }

    /// Sources this replica leads, by its /metrics (0 when it does not answer).
    fn led(&self) -> usize {
        let Some((_, body)) =
            common::http::get_blocking(([127, 0, 0, 1], self.port).into(), "/metrics")
        else {
            return 0;
        };
        Metrics::parse(&body)
            .value("outbox_sources_led", &[])
            .unwrap_or(0.0) as usize
    }

    fn pid(&self) -> u32 {
        self.process.as_ref().map_or(0, RelayProcess::pid)
    }
}

/// Current and peak resident set of `pid`, MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0)
}

/// Polls `f` every 50 ms until it holds or `limit` passes; the time it took.
async fn until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if tokio::task::block_in_place(&mut f) {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("not within the limit".into(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

fn relay_config(url: &str, brokers: &str, port: u16) -> String {
    use toml::Value;
    let mut t = shipped_config();
    t.remove("sources");
    let table = |pairs: &[(&str, &str)]| {
        Value::Table(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect(),
        )
    };
    t.insert(
        "kafka".into(),
        match t.get("kafka") {
            Some(Value::Table(k)) => {
                let mut k = k.clone();
                k.insert("brokers".into(), brokers.into());
                Value::Table(k)
            }
            _ => table(&[("brokers", brokers)]),
        },
    );
    t.insert(
        "http".into(),
        table(&[("listen", &format!("127.0.0.1:{port}"))]),
    );
    t.insert(
        "log".into(),
        table(&[("level", "info"), ("format", "json")]),
    );
    t.insert(
        "sources".into(),
        Value::Array(vec![
            table(&[
                ("name", "hot"),
                ("schema", "hot"),
                ("topic", "scale.hot"),
                ("database_url", url),
            ]),
            table(&[
                ("name", "t-{schema}"),
                ("schema_pattern", "t_*"),
                ("topic", "scale.tenants"),
                ("database_url", url),
            ]),
        ]),
    );
    toml::to_string(&t).expect("render the relay config")
}

/// Peak relay connections per `application_name`, sampled every 100 ms.
#[derive(Default)]
struct Peaks {
    by_app: Mutex<HashMap<String, i64>>,
    stop: AtomicBool,
}

async fn sample_connections(url: String, peaks: Arc<Peaks>) {
    let c = workload::connect(&url).await;
    while !peaks.stop.load(Ordering::Relaxed) {
        if let Ok(rows) = c
            .query(
                "SELECT application_name, count(*) FROM pg_stat_activity \
                 WHERE application_name LIKE 'relay-%' GROUP BY 1",
                &[],
            )
            .await
        {
            let mut by = peaks.by_app.lock().unwrap();
            for r in rows {
                let (app, n): (String, i64) = (r.get(0), r.get(1));
                let e = by.entry(app).or_default();
                *e = (*e).max(n);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sessions each replica opened in a stretch of the server log.
fn sessions_opened(log: &str, app: &str) -> usize {
    let needle = format!("application_name={app}");
    log.lines()
        .filter(|l| l.contains("connection authorized") && l.contains(&needle))
        .count()
}

/// One hot drain: `n` rows into `hot`, in one transaction, for topic `topic`; the rate
/// from their commit until a consumer has read them all.
async fn hot_drain(
    admin: &tokio_postgres::Client,
    bootstrap: &str,
    broker: &Mutex<MockBroker>,
    topic: &str,
    n: u64,
    procs: &Procs,
) -> (f64, Instant, Instant, String) {
    broker.lock().unwrap().create_topic(topic, 6);
    let consumer = CountingConsumer::start(bootstrap, topic, 6, n, None, DRAIN_FETCH_WAIT_MS);
    admin
        .batch_execute(&format!(
            "INSERT INTO hot.outbox (aggregate_type, aggregate_id, event_type, payload, topic) \
             SELECT 'order', 'order-' || (i % 1000), 'OrderChanged', \
                    jsonb_build_object('i', i, 'note', repeat('x', 200)), '{topic}' \
             FROM generate_series(1, {n}) AS i"
        ))
        .await
        .expect("insert the hot backlog");
    let committed = Instant::now();
    let before = procs.sample();
    let reached = consumer
        .wait_target(Duration::from_secs(600))
        .await
        .expect("the hot backlog drained within 600 s");
    let cpu = procs.split_since(&before);
    let rate = n as f64 / reached.duration_since(committed).as_secs_f64();
    (rate, committed, reached, cpu)
}

/// The processes whose CPU a drain is split over.
struct Procs {
    parties: cpu::Procs,
    replicas: Vec<u32>,
}

impl Procs {
    fn sample(&self) -> (cpu::Sample, Vec<Duration>) {
        (
            cpu::sample(&self.parties, None),
            self.replicas.iter().map(|p| proc_stats(*p).cpu).collect(),
        )
    }

    /// CPU seconds of each replica, PostgreSQL, the broker and the bench since `before`.
    fn split_since(&self, before: &(cpu::Sample, Vec<Duration>)) -> String {
        let now = self.sample();
        let relays: Vec<String> = now
            .1
            .iter()
            .zip(&before.1)
            .map(|(a, b)| format!("{:.2}", a.saturating_sub(*b).as_secs_f64()))
            .collect();
        format!(
            "relays {}; {}",
            relays.join(" + "),
            cpu::split(&before.0, &now.0).trim()
        )
    }
}

/// What the cold writer did.
struct ColdRun {
    /// Sequence numbers written, and the send time of each, in order.
    sent: Vec<(u64, Instant)>,
}

/// Writes one-row transactions round-robin into tenants t_0001..=t_{cold} at `rate`
/// per second, each with its `bench_seq` header, until `stop`.
async fn write_cold(
    url: String,
    cold: usize,
    rate: f64,
    topic: String,
    book: Arc<LatencyBook>,
    capacity: u64,
    stop: Arc<AtomicBool>,
) -> ColdRun {
    let c = workload::connect(&url).await;
    let mut inserts = Vec::new();
    for i in 1..=cold {
        inserts.push(
            c.prepare(&format!(
                "INSERT INTO t_{i:04}.outbox (aggregate_type, aggregate_id, event_type, payload, headers, topic) \
                 VALUES ('tenant', $1, 'TenantChanged', $2::text::jsonb, $3::text::jsonb, $4)"
            ))
            .await
            .expect("prepare the cold insert"),
        );
    }
    let start = Instant::now();
    let mut sent = Vec::new();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) && seq < capacity {
        let due = start + Duration::from_secs_f64(seq as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let stmt = &inserts[seq as usize % cold];
        let key = format!("tenant-{}", seq % 17);
        let payload = format!("{{\"seq\": {seq}}}");
        let headers = format!("{{\"bench_seq\": \"{seq}\"}}");
        let at = Instant::now();
        book.mark_sent(seq, at);
        c.execute(stmt, &[&key, &payload, &headers, &topic])
            .await
            .expect("cold insert");
        sent.push((seq, at));
        seq += 1;
    }
    ColdRun { sent }
}

async fn run(o: &Opts, t0: Instant) -> String {
    let n_sources = o.sources + 1; // the tenants and `hot`
    progress!(
        t0,
        "starting PostgreSQL (max_connections = 100) and the mock broker"
    );
    let pg = tokio::task::spawn_blocking(|| {
        let pg = PgServer::start();
        pg.psql(
            "postgres",
            "ALTER SYSTEM SET max_connections = 100; \
             ALTER SYSTEM SET log_connections = on; \
             ALTER SYSTEM SET shared_buffers = '128MB'; \
             ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
        );
        pg.restart();
        pg.psql(
            "postgres",
            "ALTER SYSTEM SET pg_stat_statements.track_planning = on; SELECT pg_reload_conf()",
        );
        pg
    })
    .await
    .expect("start PostgreSQL");
    let admin_url = pg.url("postgres");
    pg.psql(
        "postgres",
        &format!(
            "CREATE ROLE relay LOGIN; GRANT CREATE ON DATABASE postgres TO relay; \
             CREATE SCHEMA hot AUTHORIZATION relay; \
             DO $$ BEGIN FOR i IN 0..{} LOOP \
               EXECUTE format('CREATE SCHEMA t_%s AUTHORIZATION relay', lpad(i::text, 4, '0')); \
             END LOOP; END $$",
            o.sources - 1
        ),
    );
    let server = pg.psql(
        "postgres",
        "SELECT current_setting('server_version') || ', max_connections=' || \
         current_setting('max_connections') || ', superuser_reserved_connections=' || \
         current_setting('superuser_reserved_connections')",
    );
    let broker = MockBroker::start();
    let bootstrap = broker.bootstrap();
    let broker = Mutex::new(broker);
    for (topic, partitions) in [("scale.hot", 6), ("scale.tenants", 4)] {
        broker.lock().unwrap().create_topic(topic, partitions);
    }
    let dir = tempfile::tempdir().expect("scratch directory");
    let relay_url = format!("postgres://relay@127.0.0.1:{}/postgres", pg.port);
    let mut replicas: Vec<Replica> = REPLICAS
        .iter()
        .map(|app| {
            let port = free_port();
            let config = dir.path().join(format!("{app}.toml"));
            let url = format!("{relay_url}?application_name={app}");
            std::fs::write(&config, relay_config(&url, &bootstrap, port)).expect("write config");
            Replica {
                app,
                config,
                log: dir.path().join(format!("{app}.log")),
                port,
                process: None,
            }
        })
        .collect();

    progress!(t0, "migrating {n_sources} schemas as role relay");
    let migrate_started = Instant::now();
    let migrate_log = dir.path().join("migrate.log");
    let cfg = replicas[0].config.clone();
    tokio::task::spawn_blocking(move || {
        migrate_within(&cfg, &migrate_log, Duration::from_secs(1800))
    })
    .await
    .expect("migrate");
    let migrate_took = migrate_started.elapsed();
    progress!(t0, "migrated in {:.1} s", migrate_took.as_secs_f64());

    let admin = workload::connect(&admin_url).await;
    admin
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await
        .expect("pg_stat_statements");
    let peaks = Arc::new(Peaks::default());
    let sampler = tokio::spawn(sample_connections(admin_url.clone(), peaks.clone()));

    // 1. Start.
    progress!(t0, "starting two replicas");
    for r in &mut replicas {
        r.start();
    }
    let led_all = until(Duration::from_secs(120), || {
        replicas.iter().map(Replica::led).sum::<usize>() == n_sources
    })
    .await;
    // Let the handovers of the replica that came up first settle.
    let settled = until(Duration::from_secs(60), || {
        let l: Vec<usize> = replicas.iter().map(Replica::led).collect();
        l.iter().sum::<usize>() == n_sources && l.iter().all(|x| *x <= n_sources.div_ceil(2))
    })
    .await;
    let split_start: Vec<usize> = replicas.iter().map(Replica::led).collect();
    progress!(
        t0,
        "every source led after {}; shares {:?} after {}",
        secs(led_all),
        split_start,
        secs(settled)
    );

    // 2. Idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    progress!(t0, "idle for {} s", o.idle_secs);
    let mark = pg.log_mark();
    let cpu_before: Vec<Duration> = replicas.iter().map(|r| proc_stats(r.pid()).cpu).collect();
    let idle_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(o.idle_secs)).await;
    let idle_wall = idle_started.elapsed().as_secs_f64();
    let idle_log = pg.log_since(mark);
    struct Idle {
        sessions_per_min: f64,
        cpu_pct: f64,
        rss: f64,
        peak_rss: f64,
    }
    let idle: Vec<Idle> = replicas
        .iter()
        .zip(&cpu_before)
        .map(|(r, before)| {
            let cpu = proc_stats(r.pid()).cpu.saturating_sub(*before);
            let (rss, peak_rss) = rss_mib(r.pid());
            Idle {
                sessions_per_min: sessions_opened(&idle_log, r.app) as f64 * 60.0 / idle_wall,
                cpu_pct: 100.0 * cpu.as_secs_f64() / idle_wall,
                rss,
                peak_rss,
            }
        })
        .collect();

    // 3. kill -9 of replica a.
    progress!(t0, "kill -9 of {}", replicas[0].app);
    drop(replicas[0].process.take());
    let takeover = until(Duration::from_secs(120), || replicas[1].led() == n_sources).await;
    progress!(t0, "{} leads all after {}", replicas[1].app, secs(takeover));

    // 4. Its restart.
    replicas[0].start();
    let forty = (n_sources * 2).div_ceil(5);
    let rebalanced = until(Duration::from_secs(120), || replicas[0].led() >= forty).await;
    let _ = until(Duration::from_secs(60), || {
        let l: Vec<usize> = replicas.iter().map(Replica::led).collect();
        l.iter().sum::<usize>() == n_sources && l.iter().all(|x| *x <= n_sources.div_ceil(2))
    })
    .await;
    let split_after: Vec<usize> = replicas.iter().map(Replica::led).collect();
    progress!(
        t0,
        "{} leads >= 40% after {}; shares {:?}",
        replicas[0].app,
        secs(rebalanced),
        split_after
    );

    // 5. Hot and cold, interleaved rounds.
    let procs = Procs {
        parties: cpu::Procs {
            postmaster: cpu::postmaster_pid(pg.data_dir()),
            tansu: None,
            mock: Some(broker.lock().unwrap().pid()),
        },
        replicas: replicas.iter().map(Replica::pid).collect(),
    };
    let hot = Hot {
        admin: &admin,
        bootstrap: &bootstrap,
        broker: &broker,
        procs: &procs,
        relay_url: &relay_url,
        o,
        t0,
    };
    // A first drain, not measured: the hot table's first backlog is faster than the
    // ones after it (no dead tuples yet), which would favour whichever came first.
    progress!(t0, "warm-up drain of {}", o.hot);
    let _ = hot.lone("scale.hot.warmup").await;
    let mut rounds = Vec::new();
    for round in 0..o.rounds {
        // Alternate which comes first, so neither always meets the other's leftovers.
        let (lone, mixed) = if round % 2 == 0 {
            let lone = hot.lone(&format!("scale.hot.lone{round}")).await;
            (lone, hot.mixed(round).await)
        } else {
            let mixed = hot.mixed(round).await;
            (hot.lone(&format!("scale.hot.lone{round}")).await, mixed)
        };
        progress!(
            t0,
            "round {}: lone {:.0}/s, mixed {:.0}/s, cold p99 {:.1} ms",
            round + 1,
            lone,
            mixed.mixed,
            mixed.p99
        );
        rounds.push(Round { lone, ..mixed });
    }
    let statements = top_statements(&admin).await;
    let server_memory = backend_memory(&admin).await;
    peaks.stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let peak: Vec<i64> = replicas
        .iter()
        .map(|r| {
            peaks
                .by_app
                .lock()
                .unwrap()
                .get(r.app)
                .copied()
                .unwrap_or(0)
        })
        .collect();
    for r in &mut replicas {
        if let Some(p) = r.process.take() {
            p.stop();
        }
    }
    render(&Report {
        o,
        server,
        n_sources,
        migrate_took,
        led_all,
        split_start,
        idle_secs: idle_wall,
        idle: idle
            .iter()
            .map(|i| (i.sessions_per_min, i.cpu_pct, i.rss, i.peak_rss))
            .collect(),
        peak,
        takeover,
        rebalanced,
        split_after,
        rounds,
        statements,
        server_memory,
    })
}

/// Private memory of each replica's server processes (the backends behind its
/// connections), MiB, from /proc/PID/smaps_rollup: what the relay costs the server
/// beyond shared buffers (plans, prepared statements, caches).
async fn backend_memory(admin: &tokio_postgres::Client) -> Vec<(f64, usize)> {
    let rows = admin
        .query(
            "SELECT application_name, pid FROM pg_stat_activity \
             WHERE application_name LIKE 'relay-%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap_or_default();
    REPLICAS
        .iter()
        .map(|app| {
            let pids: Vec<i32> = rows
                .iter()
                .filter(|r| r.get::<_, String>(0) == *app)
                .map(|r| r.get(1))
                .collect();
            let kib: f64 = pids
                .iter()
                .map(|pid| {
                    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                        .unwrap_or_default();
                    ["Private_Clean:", "Private_Dirty:"]
                        .iter()
                        .filter_map(|k| {
                            text.lines()
                                .find_map(|l| l.strip_prefix(k))
                                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                        })
                        .sum::<f64>()
                })
                .sum();
            (kib / 1024.0, pids.len())
        })
        .collect()
}

/// The statements that cost PostgreSQL the most time over the whole run (planning
/// and execution), from pg_stat_statements, their text shortened, each tenant
/// schema's copies summed.
async fn top_statements(admin: &tokio_postgres::Client) -> String {
    let rows = admin
        .query(
            // The same statement of every tenant's schema counts as one.
            "SELECT sum(calls)::int8, sum(total_plan_time), sum(total_exec_time), q \
             FROM (SELECT calls, total_plan_time, total_exec_time, \
                 regexp_replace(left(regexp_replace(query, '\"?t_[0-9]{4}\"?', 't_*', 'g'), 90), \
                     '\\s+', ' ', 'g') AS q \
                 FROM pg_stat_statements) s \
             GROUP BY q ORDER BY sum(total_plan_time) + sum(total_exec_time) DESC LIMIT 14",
            &[],
        )
        .await
        .unwrap_or_default();
    let mut s = String::from(
        "| calls | planning, ms | execution, ms | per call, ms | statement |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let (calls, plan, exec, q): (i64, f64, f64, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        s.push_str(&format!(
            "| {calls} | {plan:.0} | {exec:.0} | {:.3} | `{}` |\n",
            (plan + exec) / calls.max(1) as f64,
            q.replace('|', "/")
        ));
    }
    s
}

/// The hot-and-cold runs' shared parts.
struct Hot<'a> {
    admin: &'a tokio_postgres::Client,
    bootstrap: &'a str,
    broker: &'a Mutex<MockBroker>,
    procs: &'a Procs,
    relay_url: &'a str,
    o: &'a Opts,
    t0: Instant,
}

impl Hot<'_> {
    /// The hot source drains its backlog alone: its rate.
    async fn lone(&self, topic: &str) -> f64 {
        let (rate, _, _, cpu) = hot_drain(
            self.admin,
            self.bootstrap,
            self.broker,
            topic,
            self.o.hot,
            self.procs,
        )
        .await;
        progress!(self.t0, "  alone: {rate:.0}/s; {cpu}");
        rate
    }

    /// The hot source drains its backlog while the cold tenants are written: its rate
    /// and the cold events' latency while it drained.
    async fn mixed(&self, round: u32) -> Round {
        let o = self.o;
        let cold_topic = format!("scale.cold.r{round}");
        self.broker.lock().unwrap().create_topic(&cold_topic, 4);
        let capacity = (o.cold_rate * 900.0) as u64;
        let book = Arc::new(LatencyBook::new(capacity));
        let cold_consumer = CountingConsumer::start(
            self.bootstrap,
            &cold_topic,
            4,
            u64::MAX,
            Some(book.clone()),
            1,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(write_cold(
            self.relay_url.to_string(),
            o.cold,
            o.cold_rate,
            cold_topic.clone(),
            book.clone(),
            capacity,
            stop.clone(),
        ));
        // Two seconds of cold traffic before the hot backlog arrives: the producer has
        // the new topic's metadata by then.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (mixed, from, to, cpu) = hot_drain(
            self.admin,
            self.bootstrap,
            self.broker,
            &format!("scale.hot.mixed{round}"),
            o.hot,
            self.procs,
        )
        .await;
        progress!(
            self.t0,
            "  with {} cold tenants at {}/s: {mixed:.0}/s; {cpu}",
            o.cold,
            o.cold_rate
        );
        stop.store(true, Ordering::Relaxed);
        let cold = writer.await.expect("cold writer");
        let total = cold.sent.len() as u64;
        cold_consumer
            .wait_count(total, Duration::from_secs(60))
            .await;
        // The cold events written while the hot one drained.
        let during: Vec<u64> = cold
            .sent
            .iter()
            .filter(|(_, at)| *at >= from && *at <= to)
            .map(|(s, _)| *s)
            .collect();
        let first = during.first().copied().unwrap_or(0);
        let last = during.last().map_or(0, |s| s + 1);
        let (lat, missing) = book.latencies_ms(first..last);
        let (all_lat, all_missing) = book.latencies_ms(0..total);
        Round {
            lone: f64::NAN,
            mixed,
            cold_during: lat.len(),
            missing: missing + all_missing,
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            p99_all: percentile(&all_lat, 0.99),
            duplicates: book.duplicates(),
        }
    }
}

struct Round {
    lone: f64,
    mixed: f64,
    cold_during: usize,
    missing: u64,
    p50: f64,
    p99: f64,
    p99_all: f64,
    duplicates: u64,
}

struct Report<'a> {
    o: &'a Opts,
    server: String,
    n_sources: usize,
    migrate_took: Duration,
    led_all: Option<Duration>,
    split_start: Vec<usize>,
    idle_secs: f64,
    /// Per replica: sessions opened per minute, CPU %, RSS and peak RSS (MiB).
    idle: Vec<(f64, f64, f64, f64)>,
    peak: Vec<i64>,
    takeover: Option<Duration>,
    rebalanced: Option<Duration>,
    split_after: Vec<usize>,
    rounds: Vec<Round>,
    /// The statements PostgreSQL spent the most time on.
    statements: String,
    /// Per replica: its server processes' private memory (MiB), and how many.
    server_memory: Vec<(f64, usize)>,
}

fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let n = r.n_sources;
    let pct = |x: usize| 100.0 * x as f64 / n as f64;
    let _ = writeln!(s, "# outbox-relay scale bench\n");
    let _ = writeln!(
        s,
        "{} sources ({} tenants by schema_pattern and `hot`) in one database, two replicas as role `relay`, pool_size and every other setting from config/default.toml. PostgreSQL {}. Broker: librdkafka's mock cluster in its own process. Machine: {} CPUs.\n",
        n,
        r.o.sources,
        r.server,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let _ = writeln!(s, "| | {} | {} | target |", REPLICAS[0], REPLICAS[1]);
    let _ = writeln!(s, "|---|---|---|---|");
    let _ = writeln!(
        s,
        "| every source led, from the start of both | {} | | <= 30 s |",
        secs(r.led_all)
    );
    let _ = writeln!(
        s,
        "| share after start | {} ({:.0}%) | {} ({:.0}%) | 40-60% each |",
        r.split_start[0],
        pct(r.split_start[0]),
        r.split_start[1],
        pct(r.split_start[1])
    );
    let _ = writeln!(
        s,
        "| peak connections (whole run, sampled every 100 ms) | {} | {} | <= 12 |",
        r.peak[0], r.peak[1]
    );
    let _ = writeln!(
        s,
        "| sessions opened per minute, idle ({:.0} s) | {:.2} | {:.2} | <= 1 |",
        r.idle_secs, r.idle[0].0, r.idle[1].0
    );
    let _ = writeln!(
        s,
        "| CPU while idle | {:.2}% | {:.2}% | < 1% of a core |",
        r.idle[0].1, r.idle[1].1
    );
    let _ = writeln!(
        s,
        "| RSS while idle (peak so far) | {:.1} MiB ({:.1}) | {:.1} MiB ({:.1}) | < 64 MiB |",
        r.idle[0].2, r.idle[0].3, r.idle[1].2, r.idle[1].3
    );
    let _ = writeln!(
        s,
        "| kill -9 of {}: {} leads all after | | {} | <= 10 s |",
        REPLICAS[0],
        REPLICAS[1],
        secs(r.takeover)
    );
    let _ = writeln!(
        s,
        "| {} restarted: leads >= 40% after | {} | | <= 30 s |",
        REPLICAS[0],
        secs(r.rebalanced)
    );
    let _ = writeln!(
        s,
        "| share after the restart | {} ({:.0}%) | {} ({:.0}%) | |",
        r.split_after[0],
        pct(r.split_after[0]),
        r.split_after[1],
        pct(r.split_after[1])
    );
    let _ = writeln!(
        s,
        "| its server processes' private memory, after the hot and cold rounds | {:.1} MiB ({} processes) | {:.1} MiB ({}) | |",
        r.server_memory[0].0, r.server_memory[0].1, r.server_memory[1].0, r.server_memory[1].1
    );
    let _ = writeln!(
        s,
        "| `migrate` of {} schemas (one connection) | {:.1} s | | |",
        n,
        r.migrate_took.as_secs_f64()
    );
    let _ = writeln!(
        s,
        "\nHot and cold: `hot` drains {} events alone, then again while {} cold tenants are written at {}/s in one-row transactions (commit to consumer; the consumer's fetch.wait.max.ms is 1):\n",
        r.o.hot, r.o.cold, r.o.cold_rate
    );
    let _ = writeln!(
        s,
        "| round | hot alone, events/s | hot with cold, events/s | ratio | cold events during the drain | cold p50 | cold p99 | cold p99, whole run (from 2 s before the drain) | missing | duplicates |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for (i, x) in r.rounds.iter().enumerate() {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.2} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} | {} |",
            i + 1,
            x.lone,
            x.mixed,
            x.mixed / x.lone,
            x.cold_during,
            x.p50,
            x.p99,
            x.p99_all,
            x.missing,
            x.duplicates
        );
    }
    let ratio = median(r.rounds.iter().map(|x| x.mixed / x.lone).collect());
    let p99 = median(r.rounds.iter().map(|x| x.p99).collect());
    let verdict = |ok: bool| if ok { "met" } else { "NOT MET" };
    let _ = writeln!(
        s,
        "\nWhat PostgreSQL spent its time on over the whole run (pg_stat_statements, every role):\n\n{}",
        r.statements
    );
    let _ = writeln!(s, "\nTARGETS (issue 14):");
    let checks = [
        (
            "every source led within 30 s",
            r.led_all.is_some_and(|d| d <= Duration::from_secs(30)),
        ),
        (
            "at most 12 connections per replica",
            r.peak.iter().all(|p| *p <= 12),
        ),
        (
            "at most 1 session opened per minute while idle",
            r.idle.iter().all(|i| i.0 <= 1.0),
        ),
        (
            "idle CPU under 1% of a core",
            r.idle.iter().all(|i| i.1 < 1.0),
        ),
        ("RSS under 64 MiB", r.idle.iter().all(|i| i.3 < 64.0)),
        (
            "each leads 40-60% after start",
            r.split_start
                .iter()
                .all(|x| (40.0..=60.0).contains(&pct(*x))),
        ),
        (
            "kill -9: the other leads all within 10 s",
            r.takeover.is_some_and(|d| d <= Duration::from_secs(10)),
        ),
        (
            "restart: at least 40% within 30 s",
            r.rebalanced.is_some_and(|d| d <= Duration::from_secs(30)),
        ),
        ("cold p99 at most 100 ms (median of rounds)", p99 <= 100.0),
        (
            "hot drain at least 0.8 of the lone (median of rounds)",
            ratio >= 0.8,
        ),
        (
            "no cold event missing",
            r.rounds.iter().all(|x| x.missing == 0),
        ),
    ];
    for (what, ok) in checks {
        let _ = writeln!(s, "- {what}: {}", verdict(ok));
    }
    let _ = writeln!(
        s,
        "  (cold p99 median {p99:.1} ms; hot ratio median {ratio:.2})"
    );
    s
}
