//! The librdkafka producer: its settings, and where its own logs go.

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use rdkafka::ClientConfig;
use tracing::{debug, error};

use crate::config::KafkaSettings;

/// Routes librdkafka's own logs and errors. Its per-attempt connection errors go to
/// debug: the relay logs an outage once at its start, reminds, and logs its end.
pub struct RelayContext;

impl ClientContext for RelayContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
                error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            _ => debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            error!(target: "librdkafka", error = %error, reason, "kafka producer failed fatally");
        } else {
            debug!(target: "librdkafka", error = %error, reason, "kafka client error");
        }
    }
}

/// The producer type the relay uses.
pub type Producer = FutureProducer<RelayContext>;

/// Creates a producer: idempotent, acks=all, murmur2 partitioner, and every operation
/// bounded by `operation_timeout`.
pub(crate) fn create_producer(
    kafka: &KafkaSettings,
    operation_timeout: Duration,
) -> Result<Producer, KafkaError> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &kafka.brokers)
        .set("client.id", "outbox-relay")
        .set(
            "message.timeout.ms",
            operation_timeout.as_millis().to_string(),
        )
        .set(
            "socket.timeout.ms",
            operation_timeout.as_millis().max(10).to_string(),
        )
        .set("linger.ms", "5")
        // Connect to every broker at once: the idempotent producer gets its producer id
        // only from a broker that is up, and with sparse connections the first one comes
        // up when the first batch needs it, delaying that batch by librdkafka's 500 ms
        // id-retry timer, twice.
        .set("enable.sparse.connections", "false")
        // Reconnect within a second of a broker's return, not librdkafka's 10s.
        .set("reconnect.backoff.max.ms", "1000");
    for (k, v) in &kafka.properties {
        cfg.set(k, v);
    }
    // The record contract; config validation refuses properties that contradict it.
    cfg.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random");
    cfg.create_with_context(RelayContext)
}
