//! Wiring and lifecycle: pools, producer, one supervised task per source, the stats
//! refresher and the HTTP server; then an orderly, bounded shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use deadpool_postgres::Pool;
use futures::FutureExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::health::SourceHealth;
use crate::http::{router, HttpState, SourceView};
use crate::metrics::Metrics;
use crate::sink;
use crate::source::{Coordinator, Source};

/// Pause before a panicked source task starts again.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// A started relay.
pub struct Running {
    /// Where the HTTP server listens.
    pub addr: SocketAddr,
    /// Each source's name and state, in configuration order.
    pub sources: Vec<(String, Arc<SourceHealth>)>,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// Each source's fault injection, in configuration order.
    #[cfg(feature = "test-hooks")]
    pub hooks: Vec<(String, Arc<crate::source::TestHooks>)>,
    done: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    /// Waits until the relay has shut down.
    pub async fn wait(self) -> Result<()> {
        self.done.await.context("relay task")?
    }

    /// A source's state by name.
    pub fn state(&self, name: &str) -> Option<&Arc<SourceHealth>> {
        self.sources.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// A source's fault injection by name.
    #[cfg(feature = "test-hooks")]
    pub fn hooks(&self, name: &str) -> Option<&Arc<crate::source::TestHooks>> {
        self.hooks.iter().find(|(n, _)| n == name).map(|(_, h)| h)
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
    let names: Vec<&str> = settings.sources.iter().map(|s| s.name.as_str()).collect();
    let metrics = Arc::new(Metrics::new(&names));
    for s in &settings.sources {
        metrics
            .dead_letter_capacity
            .with_label_values(&[&s.name])
            .set(settings.dead_letter_size);
    }
    let sink = Arc::new(
        sink::Sink::new(&settings.kafka, settings.operation_timeout)
            .context("create the Kafka producer")?,
    );

    // Per database: one coordination connection (the locks of every source this relay
    // leads there, and their wake-ups) and one pool of `pool_size` for claims, settles
    // and stats, shared by its sources. The pool hands out connections first come,
    // first served, so a busy source keeps a quiet one waiting for about one claim.
    let mut per_db: HashMap<String, (Pool, Arc<Coordinator>)> = HashMap::new();
    let mut in_db: HashMap<String, Vec<String>> = HashMap::new();
    for s in &settings.sources {
        in_db
            .entry(s.database_url.identity())
            .or_default()
            .push(s.schema.clone());
    }
    let mut sources = Vec::new();
    for s in &settings.sources {
        let id = s.database_url.identity();
        let (pool, coordinator) = match per_db.get(&id) {
            Some(both) => both.clone(),
            None => {
                let p = s
                    .database_url
                    .pool(settings.pool_size, settings.operation_timeout)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("source {}", s.name))?;
                let c = Arc::new(Coordinator::new(
                    s.database_url.clone(),
                    settings.operation_timeout,
                    in_db[&id].clone(),
                ));
                per_db.insert(id, (p.clone(), c.clone()));
                (p, c)
            }
        };
        sources.push(Arc::new(Source::new(
            s.clone(),
            pool,
            coordinator,
            settings.clone(),
            sink.clone(),
            metrics.clone(),
        )));
    }

    let listener = tokio::net::TcpListener::bind(settings.http.listen)
        .await
        .with_context(|| format!("listen on {}", settings.http.listen))?;
    let addr = listener.local_addr()?;
    let http_state = Arc::new(HttpState {
        settings: settings.clone(),
        metrics: metrics.clone(),
        sources: sources
            .iter()
            .map(|s| SourceView {
                name: s.settings.name.clone(),
                pool: s.pool.clone(),
                health: s.health.clone(),
                coordinator: s.coordinator.clone(),
            })
            .collect(),
        sink: sink.clone(),
        deep_cache: tokio::sync::Mutex::new(None),
    });

    let work = shutdown.child_token();
    let mut tasks = JoinSet::new();
    for s in &sources {
        tasks.spawn(supervise(s.clone(), work.clone()));
    }
    let stats_task = tokio::spawn(crate::source::refresh_stats(
        sources.clone(),
        settings.health.refresh_interval,
        work.clone(),
    ));
    let http_cancel = shutdown.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(listener, router(http_state))
            .with_graceful_shutdown(http_cancel.cancelled_owned())
            .await
    });
    info!(%addr, sources = settings.sources.len(), enabled = settings.enabled, "relay started");

    let list: Vec<(String, Arc<SourceHealth>)> = sources
        .iter()
        .map(|s| (s.settings.name.clone(), s.health.clone()))
        .collect();
    #[cfg(feature = "test-hooks")]
    let hooks = sources
        .iter()
        .map(|s| (s.settings.name.clone(), s.hooks.clone()))
        .collect();
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
        stats_task.abort();
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
        sources: list,
        metrics,
        #[cfg(feature = "test-hooks")]
        hooks,
        done,
    })
}

/// Runs a source, catching a panic and starting it again after a pause.
async fn supervise(source: Arc<Source>, cancel: CancellationToken) {
    loop {
        let r = AssertUnwindSafe(source.run(cancel.clone()))
            .catch_unwind()
            .await;
        match r {
            Ok(()) => return,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                error!(source = %source.settings.name, panic = %msg, "source task panicked; restarting it");
                source.reset_after_panic(&msg);
                tokio::select! {
                    _ = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = cancel.cancelled() => return,
                }
            }
        }
    }
}
