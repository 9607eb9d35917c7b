//! The command line: `run` (the default), `migrate`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Settings;

/// Exit code for a bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code for a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

/// Relays transactional-outbox rows from PostgreSQL to Kafka, at-least-once, in
/// per-aggregate order.
///
/// Configuration layers built-in defaults, then a TOML file, then OUTBOX_* environment
/// variables (nested keys with "__", e.g. OUTBOX_KAFKA__BROKERS).
#[derive(Debug, Parser)]
#[command(name = "outbox-relay", version, about, long_about)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, short, global = true, env = "OUTBOX_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relay every configured source until SIGTERM or SIGINT, then drain and exit 0.
    Run,
    /// Create or upgrade every source's outbox and dead-letter tables (idempotent).
    Migrate,
    /// Print the effective configuration, secrets redacted; exit 64 when it is bad.
    CheckConfig,
    /// See, replay or purge a source's dead-lettered events.
    #[command(subcommand)]
    DeadLetter(DeadLetterCommand),
}

/// Which dead-lettered events, and how to print them.
#[derive(Debug, Args)]
pub struct DeadLetterArgs {
    /// The source (its `name` in the configuration).
    #[arg(long, short)]
    pub source: String,
    /// Only these ids (the outbox ids the events had); repeat or comma-separate.
    #[arg(long, value_delimiter = ',')]
    pub id: Vec<i64>,
    /// Every event matching the other filters (replay and purge need --id or --all).
    #[arg(long)]
    pub all: bool,
    /// Only events of this type.
    #[arg(long)]
    pub event_type: Option<String>,
    /// Only events dead-lettered longer ago than this (e.g. 30m, 2h, 7d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub older_than: Option<std::time::Duration>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `dead-letter` verbs.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead-lettered events, oldest failure first.
    List {
        #[command(flatten)]
        args: DeadLetterArgs,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Show dead-lettered events in full, payload included.
    Show {
        #[command(flatten)]
        args: DeadLetterArgs,
    },
    /// Move events back into the outbox (id, event_id and idempotency_token kept,
    /// retries reset), atomically. Fix the cause first.
    Replay {
        #[command(flatten)]
        args: DeadLetterArgs,
    },
    /// Delete events for good. Asks for confirmation unless --yes.
    Purge {
        #[command(flatten)]
        args: DeadLetterArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

/// The runtime's worker threads: `TOKIO_WORKER_THREADS`, else one. The relay's tasks
/// mostly wait for PostgreSQL and Kafka, and librdkafka has threads of its own; with a
/// worker per core, every statement and acknowledgement woke a task on the other
/// worker (a futex call and a context switch each): at 1,000 events/s the relay used
/// 73 µs of CPU per event with two workers and 59 with one, and drained a backlog as
/// fast.
fn worker_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// Runs the command line; what `main` calls.
pub fn main(cli: Cli) -> ExitCode {
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::CheckConfig = command {
        print!("{}", settings.redacted_toml());
        if let Err(e) = settings.require_sources() {
            eprintln!("outbox-relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        return ExitCode::SUCCESS;
    }
    if let Err(e) = settings.require_sources() {
        eprintln!("outbox-relay: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    crate::telemetry::init(&settings.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = rt.block_on(async move {
        match command {
            Command::Migrate => crate::migrate::migrate_all(&settings).await.map(|applied| {
                for a in applied {
                    println!(
                        "{}: {}",
                        a.source,
                        if a.versions.is_empty() {
                            "up to date".to_string()
                        } else {
                            format!("applied {}", a.versions.join(", "))
                        }
                    );
                    for c in &a.contradictions {
                        println!("{}: warning: {c}", a.source);
                    }
                }
            }),
            Command::Run => {
                info!(config = %settings.redacted_toml(), "effective configuration");
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                crate::app::run(settings, shutdown).await
            }
            Command::CheckConfig => Ok(()),
            Command::DeadLetter(cmd) => dead_letter(&settings, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "outbox-relay failed");
            eprintln!("outbox-relay: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn dead_letter(settings: &Settings, cmd: DeadLetterCommand) -> anyhow::Result<()> {
    use crate::dead_letter as dl;
    use std::io::{BufRead, IsTerminal, Write};
    let timeout = settings.operation_timeout;
    let args = match &cmd {
        DeadLetterCommand::List { args, .. }
        | DeadLetterCommand::Show { args }
        | DeadLetterCommand::Replay { args }
        | DeadLetterCommand::Purge { args, .. } => args,
    };
    let source = &settings.source(&args.source)?;
    let filter = dl::Filter {
        ids: args.id.clone(),
        event_type: args.event_type.clone(),
        older_than: args.older_than,
        all: args.all,
    };
    let print_ids = |what: &str, ids: &[i64]| {
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "source": source.name, what: ids })
            );
        } else {
            println!(
                "{}: {what} {} event(s){}",
                source.name,
                ids.len(),
                if ids.is_empty() {
                    String::new()
                } else {
                    format!(": {ids:?}")
                }
            );
        }
    };
    match cmd {
        DeadLetterCommand::List { limit, .. } => {
            let events = dl::list(source, &filter, limit, false, timeout).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                print!("{}", dl::table(&events));
            }
        }
        DeadLetterCommand::Show { .. } => {
            if filter.ids.is_empty() && !filter.all {
                anyhow::bail!("show: name rows with --id (or --all)");
            }
            let events = dl::list(source, &filter, 1000, true, timeout).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else if events.is_empty() {
                println!("no matching dead-lettered events");
            } else {
                for e in &events {
                    println!("{}", dl::detail(e));
                }
            }
        }
        DeadLetterCommand::Replay { .. } => {
            let ids = dl::replay(source, &filter, timeout).await?;
            print_ids("replayed", &ids);
        }
        DeadLetterCommand::Purge { yes, .. } => {
            if !yes {
                let n = dl::list(source, &filter, i64::MAX, false, timeout)
                    .await?
                    .len();
                if !std::io::stdin().is_terminal() {
                    anyhow::bail!("purge would delete {n} event(s) of source {} for good; pass --yes to confirm", source.name);
                }
                eprint!("purge deletes {n} dead-lettered event(s) of source {} for good. Type yes to confirm: ", source.name);
                std::io::stderr().flush().ok();
                let mut answer = String::new();
                std::io::stdin().lock().read_line(&mut answer)?;
                if answer.trim() != "yes" {
                    anyhow::bail!("purge cancelled");
                }
            }
            let ids = dl::purge(source, &filter, timeout).await?;
            print_ids("purged", &ids);
        }
    }
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        shutdown.cancel();
    });
}
