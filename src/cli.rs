//! The command line: `run` (the default), `migrate`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
                }
            }),
            Command::Run => {
                info!(config = %settings.redacted_toml(), "effective configuration");
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                crate::app::run(settings, shutdown).await
            }
            Command::CheckConfig => Ok(()),
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
