//! The one-command demo: `cargo run --release --example demo [-- --duration 20s]`.
//!
//! On a machine with Rust and the PostgreSQL server binaries it starts, in seconds:
//!
//! * a throwaway PostgreSQL (temp dir, free port, removed at exit) with the databases
//!   `platform` (customer, product) and `catalog` (product-admin, product-loader);
//! * librdkafka's in-process mock Kafka cluster with the four topics;
//! * the four outbox schemas, migrated by `outbox_relay::migrate::migrate_all`;
//! * the relay itself (`outbox_relay::app::start`) with its HTTP server;
//! * the four services, writing domain rows and outbox events in the same transactions,
//!   a few of them rolled back;
//! * a consumer that reads every partition from the beginning and checks each event.
//!
//! Ctrl-C (or `--duration`) stops the services, waits until every outbox is empty and
//! the consumer has everything, stops the relay and prints a summary. The exit code is 0
//! only when no committed event was lost, none arrived out of order and no rolled-back
//! event was published.

mod consumer;
mod display;
mod ledger;
mod outboxes;
mod postgres;
mod services;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use outbox_relay::config::Settings;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use consumer::Consumer;
use display::{Progress, Row, Summary};
use ledger::Ledger;
use outbox_relay::app::Running;
use outboxes::Observers;
use postgres::Postgres;

/// Partitions of every demo topic.
const PARTITIONS: i32 = 3;
/// How long the outboxes and the consumer get to catch up after the services stop.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the consumer keeps reading after it has everything, to catch duplicates.
const LINGER: Duration = Duration::from_secs(1);

/// Runs outbox-relay end to end on this machine: a throwaway PostgreSQL, an in-process
/// Kafka-protocol cluster, four services writing events in real transactions, the relay,
/// and a consumer proving that nothing committed is lost.
#[derive(Debug, Parser)]
#[command(name = "demo")]
struct Args {
    /// Stop by itself after this long (`20s`, `2m`; a bare number is seconds).
    /// Without it the demo runs until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Committed events per second the four services write together.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// The relay's batch_size (rows claimed per batch).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Port of the relay's HTTP server on 127.0.0.1; a free port when it is taken.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Self-test of the verifier: also commit N customer events that can never be
    /// published (a header value that is not a string), so the relay dead-letters them,
    /// they never arrive, and the demo must report them lost and exit 1.
    #[arg(long, default_value_t = 0, hide = true)]
    poison: u32,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    outbox_relay::config::parse_duration(&serde_json::Value::String(s.to_string()))
}

/// One of the platform's four services, with its outbox source in the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Customer,
    Product,
    ProductAdmin,
    ProductLoader,
}

/// The four services, in display order.
pub const SERVICES: [Service; 4] = [
    Service::Customer,
    Service::Product,
    Service::ProductAdmin,
    Service::ProductLoader,
];

impl Service {
    /// The relay's source name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Customer => "customer",
            Service::Product => "product",
            Service::ProductAdmin => "product-admin",
            Service::ProductLoader => "product-loader",
        }
    }

    /// The schema holding the service's tables and its outbox.
    pub fn schema(self) -> &'static str {
        match self {
            Service::Customer => "customer",
            Service::Product => "product",
            Service::ProductAdmin => "product_admin",
            Service::ProductLoader => "product_loader",
        }
    }

    /// The topic the relay publishes the service's events to.
    pub fn topic(self) -> &'static str {
        match self {
            Service::Customer => "customer.events",
            Service::Product => "product.events",
            Service::ProductAdmin => "product-admin.events",
            Service::ProductLoader => "product-loader.events",
        }
    }

    /// The database the service lives in (as in the platform's Secret).
    pub fn database(self) -> &'static str {
        match self {
            Service::Customer | Service::Product => "platform",
            Service::ProductAdmin | Service::ProductLoader => "catalog",
        }
    }

    /// Position in [`SERVICES`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The service whose topic this is.
    pub fn by_topic(topic: &str) -> Option<Service> {
        SERVICES.into_iter().find(|s| s.topic() == topic)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("demo: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Relay logs go to stderr, warnings and errors only, so they do not scroll the
/// progress display away; `RUST_LOG=info` shows everything.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Runs the demo; `Ok(true)` when the verdict is a pass.
async fn run(args: Args) -> Result<bool> {
    // First Ctrl-C: stop and verify. Second: stop waiting for the drain.
    let stop = CancellationToken::new();
    let hurry = CancellationToken::new();
    spawn_signal_handler(stop.clone(), hurry.clone());

    println!(
        "outbox-relay demo: starting PostgreSQL, Kafka (mock), the relay and four services..."
    );
    let setup_started = Instant::now();
    let demo = Demo::start(&args).await?;
    let writers_stop = CancellationToken::new();
    let mut writers = JoinSet::new();
    for w in services::writer_plan(&demo.pg, args.rate) {
        let (ledger, cancel, name) = (demo.ledger.clone(), writers_stop.clone(), w.service.name());
        writers.spawn(async move {
            services::run_writer(w, ledger, cancel)
                .await
                .with_context(|| format!("{name} writer"))
        });
    }
    if args.poison > 0 {
        let url = demo.pg.url(Service::Customer.database());
        services::write_poison(&url, args.poison, &demo.ledger).await?;
    }
    println!(
        "ready in {:.1}s: PostgreSQL {} on 127.0.0.1:{} (databases platform, catalog), \
         Kafka mock cluster {}, relay batch_size {}",
        setup_started.elapsed().as_secs_f64(),
        demo.pg.version(),
        demo.pg.port(),
        demo.kafka.bootstrap_servers(),
        args.batch_size,
    );
    let base = format!("http://{}", demo.relay.addr);
    let footer = vec![
        format!("  health:  {base}/health    deep: {base}/health/deep    metrics: {base}/metrics"),
        match args.duration {
            Some(d) => format!(
                "  stops by itself after {}; Ctrl-C stops earlier; then drains and verifies",
                humantime::format_duration(d)
            ),
            None => "  Ctrl-C stops the services, drains the outboxes and verifies".to_string(),
        },
    ];
    for line in &footer {
        println!("{line}");
    }
    println!();

    // Load, until --duration, Ctrl-C, or a writer failing.
    let load_started = Instant::now();
    let mut progress = Progress::new();
    let mut tick = tokio::time::interval_at(
        load_started + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let until = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until);
    let mut writer_results = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
            _ = &mut until => break,
            Some(done) = writers.join_next() => {
                // A writer only ends early on an error.
                writer_results.push(flatten(done));
                break;
            }
        }
        let phase = format!("running {:>3}s", load_started.elapsed().as_secs());
        progress.show(&phase, &demo.rows(), &footer);
    }
    let load_time = load_started.elapsed();

    // Stop the services between transactions, then let the relay and the consumer finish.
    writers_stop.cancel();
    while let Some(done) = writers.join_next().await {
        writer_results.push(flatten(done));
    }
    let drain_started = Instant::now();
    let drained = demo.drain(&hurry, &mut progress, &footer).await?;
    let drain_time = drain_started.elapsed();
    if drained {
        // Keep reading a little longer: late duplicates count too.
        tokio::select! {
            _ = tokio::time::sleep(LINGER) => {}
            _ = hurry.cancelled() => {}
        }
    }
    let phase = if drained { "drained" } else { "stopped" };
    progress.show_final(phase, &demo.rows(), &footer);

    let ledger = demo.ledger.clone();
    let stopped = demo.stop().await?;
    let summary = Summary {
        ledger: &ledger,
        left_in_outbox: stopped.left_in_outbox,
        dead_lettered: stopped.dead_lettered,
        load_time,
        drain_time,
        drained,
        problems: writer_results
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .chain(stopped.problems)
            .collect(),
    };
    Ok(summary.print())
}

/// Everything the demo runs besides the service writers.
struct Demo {
    pg: Postgres,
    /// Not `Send`: lives on the main task.
    kafka: MockCluster<'static, DefaultProducerContext>,
    relay: Running,
    relay_stop: CancellationToken,
    ledger: Arc<Ledger>,
    consumer: Consumer,
    observers: Observers,
}

/// What is left once the demo stopped.
struct Stopped {
    left_in_outbox: [i64; 4],
    dead_lettered: [i64; 4],
    problems: Vec<String>,
}

impl Demo {
    /// PostgreSQL with both databases, the mock cluster with the topics, the migrated
    /// schemas and domain tables, the relay and the consumer.
    async fn start(args: &Args) -> Result<Demo> {
        let pg = tokio::task::spawn_blocking(Postgres::start)
            .await
            .context("start PostgreSQL")??;
        for db in ["platform", "catalog"] {
            pg.create_database(db).await?;
        }
        let kafka = MockCluster::new(1).context("start the mock Kafka cluster")?;
        for s in SERVICES {
            kafka
                .create_topic(s.topic(), PARTITIONS, 1)
                .with_context(|| format!("create topic {}", s.topic()))?;
        }
        let brokers = kafka.bootstrap_servers();
        let toml = relay_toml(&pg, &brokers, http_listen(args.port), args.batch_size);
        let settings = Settings::from_parts(Some(&toml), &HashMap::new())
            .map_err(|e| anyhow::anyhow!("{e}\n{toml}"))?;
        outbox_relay::migrate::migrate_all(&settings)
            .await
            .context("migrate the outbox schemas")?;
        for db in ["platform", "catalog"] {
            services::create_domain_tables(&pg.url(db), db).await?;
        }
        let relay_stop = CancellationToken::new();
        let relay = outbox_relay::app::start(settings, relay_stop.clone())
            .await
            .context("start the relay")?;
        let ledger = Arc::new(Ledger::default());
        let consumer = Consumer::start(&brokers, PARTITIONS, ledger.clone())?;
        let observers = Observers::connect(&pg).await?;
        Ok(Demo {
            pg,
            kafka,
            relay,
            relay_stop,
            ledger,
            consumer,
            observers,
        })
    }

    /// The progress table: the ledger's counts and the relay's view of each source.
    fn rows(&self) -> Vec<Row> {
        SERVICES
            .iter()
            .map(|s| {
                let c = self.ledger.service(*s);
                let state = self.relay.state(s.name()).unwrap_or_default();
                Row {
                    name: s.name(),
                    written: c.committed.load(Ordering::Relaxed),
                    rolled_back: c.rolled_back.load(Ordering::Relaxed),
                    relayed: c.distinct.load(Ordering::Relaxed),
                    pending: state.pending.load(Ordering::Relaxed),
                    lag_s: self
                        .relay
                        .metrics
                        .oldest_pending_age
                        .with_label_values(&[s.name()])
                        .get(),
                    dead_lettered: state.dead_letter_rows.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Waits until every outbox is empty and the consumer received everything that was
    /// not dead-lettered; false when DRAIN_TIMEOUT passed or `hurry` was cancelled first.
    async fn drain(
        &self,
        hurry: &CancellationToken,
        progress: &mut Progress,
        footer: &[String],
    ) -> Result<bool> {
        let started = Instant::now();
        let mut last_draw = started;
        loop {
            let pending = self.observers.pending().await?;
            let dead = self.observers.dead_lettered().await?;
            let caught_up = SERVICES.iter().all(|s| {
                let c = self.ledger.service(*s);
                pending[s.index()] == 0
                    && c.distinct.load(Ordering::Relaxed) + dead[s.index()] as u64
                        >= c.committed.load(Ordering::Relaxed)
            });
            if caught_up {
                return Ok(true);
            }
            if started.elapsed() >= DRAIN_TIMEOUT || hurry.is_cancelled() {
                return Ok(false);
            }
            if last_draw.elapsed() >= Duration::from_secs(1) {
                last_draw = Instant::now();
                let left: i64 = pending.iter().sum();
                let unseen: u64 = SERVICES
                    .iter()
                    .map(|s| {
                        let c = self.ledger.service(*s);
                        c.committed.load(Ordering::Relaxed).saturating_sub(
                            c.distinct.load(Ordering::Relaxed) + dead[s.index()] as u64,
                        )
                    })
                    .sum();
                let phase = format!(
                    "draining: {left} rows left in the outboxes, {unseen} events not received \
                     yet (Ctrl-C again to stop waiting)"
                );
                progress.show(&phase, &self.rows(), footer);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = hurry.cancelled() => {}
            }
        }
    }

    /// Stops the relay cleanly, then the consumer, PostgreSQL and Kafka.
    async fn stop(self) -> Result<Stopped> {
        let mut problems = Vec::new();
        self.relay_stop.cancel();
        match tokio::time::timeout(Duration::from_secs(20), self.relay.wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => problems.push(format!("the relay stopped with an error: {e:#}")),
            Err(_) => problems.push("the relay did not stop within 20s".to_string()),
        }
        if let Err(e) = self.consumer.stop().await {
            problems.push(e);
        }
        let left_in_outbox = self.observers.pending().await?;
        let dead_lettered = self.observers.dead_lettered().await?;
        drop(self.observers);
        drop(self.kafka);
        let pg = self.pg;
        tokio::task::spawn_blocking(move || drop(pg)).await.ok();
        Ok(Stopped {
            left_in_outbox,
            dead_lettered,
            problems,
        })
    }
}

fn flatten(r: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.map_err(anyhow::Error::from).and_then(|r| r)
}

/// 127.0.0.1:`port` when it is free, else any free port.
fn http_listen(port: u16) -> SocketAddr {
    let wanted = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpListener::bind(wanted) {
        Ok(_) => wanted,
        Err(_) => {
            eprintln!("demo: port {port} is taken; the relay's HTTP server gets a free port");
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
        }
    }
}

/// The relay's configuration: production defaults, except shorter timings so the demo
/// starts, drains and stops in seconds.
fn relay_toml(pg: &Postgres, brokers: &str, listen: SocketAddr, batch_size: usize) -> String {
    let mut t = format!(
        r#"batch_size = {batch_size}
delete_batch_size = 50
process_interval = "1s"
max_retries = 3
dead_letter_size = 1000
operation_timeout = "10s"

[retry]
backoff_base = "200ms"
backoff_max = "5s"

[kafka]
brokers = "{brokers}"

[http]
listen = "{listen}"

[health]
lag_threshold = "10s"
refresh_interval = "500ms"
"#
    );
    for s in SERVICES {
        t.push_str(&format!(
            "\n[[sources]]\nname = \"{}\"\nschema = \"{}\"\ntopic = \"{}\"\ndatabase_url = \"{}\"\n",
            s.name(),
            s.schema(),
            s.topic(),
            pg.url(s.database())
        ));
    }
    t
}

/// Cancels `stop` on the first SIGINT or SIGTERM and `hurry` on the second.
fn spawn_signal_handler(stop: CancellationToken, hurry: CancellationToken) {
    tokio::spawn(async move {
        for token in [stop, hurry] {
            interrupted().await;
            token.cancel();
        }
    });
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
