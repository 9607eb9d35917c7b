//! One outbox event as the relay holds it: read from a source's table by the store,
//! turned into a Kafka record by the sink.

use std::time::SystemTime;

use uuid::Uuid;

/// One outbox row, as the relay reads it.
#[derive(Debug, Clone)]
pub struct Event {
    /// Order of events.
    pub id: i64,
    /// Stable identity for consumers' deduplication.
    pub event_id: Uuid,
    /// Aggregate type.
    pub aggregate_type: String,
    /// Aggregate id: the Kafka key.
    pub aggregate_id: String,
    /// Event type.
    pub event_type: String,
    /// Payload JSON text; `None` is a tombstone.
    pub payload: Option<String>,
    /// Topic override.
    pub topic: Option<String>,
    /// Extra headers, JSON text.
    pub headers: Option<String>,
    /// Correlation id.
    pub correlation_id: Option<String>,
    /// Idempotency token.
    pub idempotency_token: Option<String>,
    /// When the service wrote it.
    pub created_at: SystemTime,
    /// Failed attempts so far.
    pub retry_count: i32,
    /// Attempts allowed before the dead-letter table.
    pub max_retries: i32,
}
