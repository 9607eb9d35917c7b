//! Leading a source: one relay process at a time holds the source's session advisory
//! lock, on a connection of its own that also LISTENs for new rows. The lock lives
//! exactly as long as that connection, so a relay that dies or is cut off releases it
//! as soon as PostgreSQL notices (the connection asks the server for TCP keepalives).

use std::time::Duration;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::db::{DatabaseUrl, DbError, Notice};
use crate::metrics::Metrics;
use crate::migrate::LOCK_CLASS;

use crate::health::SourceHealth;

/// How often a follower asks for a source's lock.
pub const TAKEOVER_POLL: Duration = Duration::from_secs(1);

/// The lock of one source, held: dropping it closes the connection and frees the lock.
pub struct Leadership {
    _client: tokio_postgres::Client,
    /// The connection's notifications; closes when the connection dies.
    pub notices: UnboundedReceiver<Notice>,
}

/// Opens the source's dedicated connection and tries its advisory lock; on success
/// also LISTENs for new rows. `None`: another relay holds it.
pub async fn try_lock(
    url: &DatabaseUrl,
    schema: &str,
    timeout: Duration,
) -> Result<Option<Leadership>, DbError> {
    let (client, notices) = url.connect(timeout).await?;
    let key = format!("relay:{schema}");
    let got: bool = tokio::time::timeout(
        timeout,
        client.query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&LOCK_CLASS, &key],
        ),
    )
    .await
    .map_err(|_| DbError::timed_out("advisory lock", timeout))?
    .map_err(|e| DbError::pg("advisory lock", &e))?
    .try_get(0)
    .map_err(|e| DbError::pg("advisory lock", &e))?;
    if !got {
        return Ok(None);
    }
    tokio::time::timeout(timeout, client.batch_execute("LISTEN outbox_relay"))
        .await
        .map_err(|_| DbError::timed_out("listen", timeout))?
        .map_err(|e| DbError::pg("listen", &e))?;
    Ok(Some(Leadership {
        _client: client,
        notices,
    }))
}

/// Shows whether this replica leads the source, in its health and its metric.
pub fn show_leader(health: &SourceHealth, metrics: &Metrics, name: &str, on: bool) {
    health
        .leader
        .store(on, std::sync::atomic::Ordering::Relaxed);
    metrics
        .source_leader
        .with_label_values(&[name])
        .set(on as i64);
}
