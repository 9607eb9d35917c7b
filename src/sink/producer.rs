//! The librdkafka producer: its settings, where its own logs go, and the thread that
//! hands its delivery reports back.
//!
//! rdkafka's `FutureProducer` serves delivery reports on a thread that polls in 100 ms
//! steps and spins through the last millisecond of each (rdkafka 0.38 rounds the time
//! left down to whole milliseconds, then polls with 0): about 0.7% of a core with
//! nothing to deliver, most of an idle relay's CPU. The relay's own thread polls in
//! 10 s steps, which spins one millisecond in ten seconds; a report is still handed
//! back the moment librdkafka queues it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::{Client, ClientContext};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _, ProducerContext};
use rdkafka::ClientConfig;
use tokio::sync::oneshot;
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

impl ProducerContext for RelayContext {
    type DeliveryOpaque = Box<oneshot::Sender<Result<(), KafkaError>>>;

    fn delivery(&self, result: &DeliveryResult<'_>, answer: Self::DeliveryOpaque) {
        let _ = answer.send(result.as_ref().map(|_| ()).map_err(|(e, _)| e.clone()));
    }
}

/// What becomes of one record: acknowledged, or failed with librdkafka's error; a
/// closed channel if the producer went away without a report.
pub type Delivery = oneshot::Receiver<Result<(), KafkaError>>;

/// How long the delivery-report thread waits in one poll (see the module docs).
const REPORT_POLL: Duration = Duration::from_secs(10);

/// The producer the relay uses: cheap to clone; the last clone to go stops its
/// delivery-report thread (within [`REPORT_POLL`]).
#[derive(Clone)]
pub struct Producer {
    handle: Arc<Handle>,
}

struct Handle {
    base: Arc<BaseProducer<RelayContext>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Producer {
    fn start(base: BaseProducer<RelayContext>) -> KafkaResult<Producer> {
        let base = Arc::new(base);
        let stop = Arc::new(AtomicBool::new(false));
        let (polled, stopping) = (base.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-reports".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    polled.poll(REPORT_POLL);
                }
            })
            .map_err(|e| KafkaError::ClientCreation(format!("delivery-report thread: {e}")))?;
        Ok(Producer {
            handle: Arc::new(Handle { base, stop }),
        })
    }

    /// Hands a record over; its report comes back on the returned [`Delivery`]. A
    /// `None` payload is a tombstone.
    pub fn send(
        &self,
        topic: &str,
        key: &str,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<Delivery, KafkaError> {
        let (tx, rx) = oneshot::channel();
        let mut record = BaseRecord::with_opaque_to(topic, Box::new(tx))
            .key(key)
            .headers(headers);
        if let Some(p) = payload {
            record = record.payload(p);
        }
        self.handle
            .base
            .send(record)
            .map(|()| rx)
            .map_err(|(e, _)| e)
    }

    /// The librdkafka client, for metadata and its fatal error.
    pub fn client(&self) -> &Client<RelayContext> {
        self.handle.base.client()
    }

    /// Waits up to `timeout` for every record handed over to be acknowledged. Blocks.
    pub fn flush(&self, timeout: Duration) -> KafkaResult<()> {
        self.handle.base.flush(timeout)
    }
}

/// Creates a producer: idempotent, acks=all, murmur2 partitioner, and every operation
/// bounded by `operation_timeout`.
pub(crate) fn create_producer(
    kafka: &KafkaSettings,
    operation_timeout: Duration,
) -> Result<Producer, KafkaError> {
    Producer::start(client_config(kafka, operation_timeout).create_with_context(RelayContext)?)
}

/// The producer's settings: the relay's own, `[kafka.properties]`, then the record
/// contract (config validation refuses properties that contradict it). The benches
/// build their producers from it too.
pub fn client_config(kafka: &KafkaSettings, operation_timeout: Duration) -> ClientConfig {
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
    cfg
}
