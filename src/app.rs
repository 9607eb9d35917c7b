//! Wiring and lifecycle: the producer, one [`Database`] per database (its pool, its
//! coordination connection, its sources' supervised tasks, its stats), the HTTP server;
//! then an orderly, bounded shutdown.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{PatternSettings, Settings, SourceSettings};
use crate::database::Database;
use crate::health::SourceHealth;
use crate::http::{router, HttpState};
use crate::metrics::Metrics;
use crate::sink;

/// A started relay.
pub struct Running {
    /// Where the HTTP server listens.
    pub addr: SocketAddr,
    /// Its databases.
    pub databases: Vec<Arc<Database>>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    done: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    /// Waits until the relay has shut down.
    pub async fn wait(self) -> Result<()> {
        self.done.await.context("relay task")?
    }

    /// A source's state by name.
    pub fn state(&self, name: &str) -> Option<Arc<SourceHealth>> {
        self.source(name).map(|s| s.health.clone())
    }

    /// Every source's name, database by database.
    pub fn source_names(&self) -> Vec<String> {
        self.databases
            .iter()
            .flat_map(|d| d.sources())
            .map(|s| s.name().to_string())
            .collect()
    }

    fn source(&self, name: &str) -> Option<Arc<crate::source::Source>> {
        self.databases
            .iter()
            .flat_map(|d| d.sources())
            .find(|s| s.name() == name)
    }

    /// A source's fault injection by name.
    #[cfg(feature = "test-hooks")]
    pub fn hooks(&self, name: &str) -> Option<Arc<crate::source::TestHooks>> {
        self.source(name).map(|s| s.hooks.clone())
    }
}

/// Runs the relay until `shutdown` is cancelled, then drains and returns.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    start(settings, shutdown).await?.wait().await
}

/// Starts the relay: every task is running when this returns.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> Result<Running> {
    settings.require_sources()?;
    let settings = Arc::new(settings);
    let metrics = Arc::new(Metrics::new(&[]));
    metrics
        .wakeup_mode
        .with_label_values(&[settings.wakeup.label()])
        .set(1);
    let sink = Arc::new(
        sink::Sink::new(&settings.kafka, settings.operation_timeout)
            .context("create the Kafka producer")?,
    );

    // Per database: one coordination connection (the locks of every source this relay
    // leads there, and their wake-ups) and one pool of `pool_size` for claims, settles
    // and stats, shared by its sources. The pool hands out connections first come,
    // first served, so a busy source keeps a quiet one waiting for about one claim.
    //
    // Sources share a pool only when their URLs connect the same way (user, TLS,
    // options included): each source claims as the role its URL names.
    let mut grouped: BTreeMap<String, (String, Vec<SourceSettings>, Vec<PatternSettings>)> =
        BTreeMap::new();
    let mut roles: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    let urls = settings
        .sources
        .iter()
        .map(|s| &s.database_url)
        .chain(settings.patterns.iter().map(|p| &p.database_url));
    for url in urls {
        roles
            .entry(url.identity())
            .or_default()
            .insert(url.pool_key());
    }
    // A database reached under several roles names each runtime by its role too.
    let label = |url: &crate::db::DatabaseUrl| match roles.get(&url.identity()) {
        Some(keys) if keys.len() > 1 => {
            format!("{}@{}", url.user().unwrap_or(""), url.identity())
        }
        _ => url.identity(),
    };
    for s in &settings.sources {
        grouped
            .entry(s.database_url.pool_key())
            .or_insert_with(|| (label(&s.database_url), Vec::new(), Vec::new()))
            .1
            .push(s.clone());
    }
    for p in &settings.patterns {
        grouped
            .entry(p.database_url.pool_key())
            .or_insert_with(|| (label(&p.database_url), Vec::new(), Vec::new()))
            .2
            .push(p.clone());
    }
    let names: crate::database::Names = Arc::new(Mutex::new(
        settings
            .sources
            .iter()
            .map(|s| s.name.clone())
            .collect::<HashSet<_>>(),
    ));
    let work = shutdown.child_token();
    let mut databases = Vec::new();
    for (label, fixed, patterns) in grouped.into_values() {
        databases.push(Database::new(
            label,
            fixed,
            patterns,
            settings.clone(),
            sink.clone(),
            metrics.clone(),
            names.clone(),
            work.clone(),
        )?);
    }

    let listener = tokio::net::TcpListener::bind(settings.http.listen)
        .await
        .with_context(|| format!("listen on {}", settings.http.listen))?;
    let addr = listener.local_addr()?;
    let http_state = Arc::new(HttpState {
        settings: settings.clone(),
        metrics: metrics.clone(),
        databases: databases.clone(),
        sink: sink.clone(),
        deep_cache: tokio::sync::Mutex::new(None),
    });

    let mut tasks = JoinSet::new();
    for d in &databases {
        tasks.spawn(d.clone().run());
    }
    let http_cancel = shutdown.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(listener, router(http_state))
            .with_graceful_shutdown(http_cancel.cancelled_owned())
            .await
    });
    info!(
        %addr,
        databases = databases.len(),
        sources = settings.sources.len(),
        patterns = settings.patterns.len(),
        enabled = settings.enabled,
        wakeup = settings.wakeup.label(),
        "relay started"
    );

    let grace = settings.operation_timeout;
    let done = tokio::spawn(async move {
        shutdown.cancelled().await;
        info!("shutting down: no new batches; finishing the ones in flight");
        work.cancel();
        let deadline = tokio::time::Instant::now() + grace.saturating_sub(Duration::from_secs(1));
        let drained = tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("shutdown: batches still in flight at the deadline were abandoned; their rows stay in the outbox and go out after restart");
            tasks.abort_all();
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let flushed =
            tokio::task::spawn_blocking(move || sink.flush(left.max(Duration::from_millis(100))))
                .await;
        if !matches!(flushed, Ok(true)) {
            warn!("shutdown: producer flush did not finish in time");
        }
        match tokio::time::timeout(Duration::from_secs(1), http_task).await {
            Ok(Ok(Err(e))) => error!(error = %e, "http server failed"),
            Err(_) => warn!("http server did not stop within 1s"),
            _ => {}
        }
        info!("relay stopped");
        Ok(())
    });
    Ok(Running {
        addr,
        databases,
        metrics,
        done,
    })
}
