//! Kafka: the producer, turning outbox rows into records, and classifying failures.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Duration;

use std::sync::RwLock;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, Producer as _};
use rdkafka::ClientConfig;
use tracing::{debug, error, warn};

use crate::config::{validate_topic, KafkaSettings};
use crate::source::store::Event;

/// Who is to blame for a failed publish, which decides what happens to the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The transport (brokers unreachable, timeouts, leader changes, credentials):
    /// not the event's fault. The row is left as it is and the source backs off.
    Transport,
    /// Perhaps the event: its retry count goes up, and it is retried after a backoff,
    /// then dead-lettered once its retries are spent.
    Retry,
    /// The event itself, and it will never succeed: dead-lettered at once.
    Permanent,
}

/// Why a publish failed: a blame and a bounded-cardinality reason for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Who is to blame.
    pub blame: Blame,
    /// A short label for `outbox_events_failed_total{reason}`.
    pub reason: &'static str,
    /// What a person reads in `last_error` or the dead-letter table.
    pub message: String,
}

impl Failure {
    /// A failure of the relay's own making when turning a row into a record.
    pub fn invalid_record(message: String) -> Failure {
        Failure {
            blame: Blame::Permanent,
            reason: "invalid_record",
            message,
        }
    }
}

/// Classifies a librdkafka error, once, for every caller.
pub fn classify(err: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    let code = err.rdkafka_error_code();
    let (blame, reason, hint) = match code {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge) => (
            Blame::Permanent,
            "message_too_large",
            "the record is larger than the producer's message.max.bytes or the broker's max.message.bytes; shrink the payload or raise the limit, then replay",
        ),
        Some(C::InvalidTopic) => (
            Blame::Permanent,
            "invalid_topic",
            "the broker refuses this topic name; fix the row's topic, then replay",
        ),
        Some(C::InvalidRecord | C::InvalidMessage | C::InvalidTimestamp) => (
            Blame::Permanent,
            "invalid_record",
            "the broker refuses this record",
        ),
        Some(
            C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::MessageTimedOut
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::Resolve
            | C::NotLeaderForPartition
            | C::LeaderNotAvailable
            | C::BrokerNotAvailable
            | C::ReplicaNotAvailable
            | C::NetworkException
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::KafkaStorageError
            | C::QueueFull
            | C::PurgeQueue
            | C::PurgeInflight
            | C::ThrottlingQuotaExceeded
            | C::FencedLeaderEpoch
            | C::UnknownLeaderEpoch
            | C::PreferredLeaderNotAvailable
            | C::TimedOutQueue
            | C::Fatal
            | C::Fenced
            | C::ProducerFenced
            | C::OutOfOrderSequenceNumber
            | C::UnknownProducerId
            | C::InvalidProducerEpoch
            | C::SSL
            | C::Authentication
            | C::SaslAuthenticationFailed
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::UnsupportedCompressionType,
        ) => (
            Blame::Transport,
            "transport",
            "the brokers are unreachable, slow or refuse the relay's credentials",
        ),
        Some(C::UnknownTopic | C::UnknownTopicOrPartition | C::UnknownPartition) => (
            Blame::Retry,
            "unknown_topic",
            "the topic does not exist and the broker does not create it; create the topic or fix the row's topic",
        ),
        _ => (Blame::Retry, "other", "unexpected error"),
    };
    Failure {
        blame,
        reason,
        message: format!("{err} ({hint})"),
    }
}

/// The failure reasons, for pre-creating every metric series at zero.
pub const FAILURE_REASONS: &[&str] = &[
    "transport",
    "message_too_large",
    "invalid_topic",
    "invalid_record",
    "unknown_topic",
    "other",
];

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

/// The shared producer, replaced when librdkafka declares it dead.
pub struct Sink {
    current: RwLock<Producer>,
    kafka: KafkaSettings,
    operation_timeout: Duration,
}

impl Sink {
    /// Creates the producer: idempotent, acks=all, murmur2 partitioner, and every
    /// operation bounded by `operation_timeout`.
    pub fn new(kafka: &KafkaSettings, operation_timeout: Duration) -> Result<Sink, KafkaError> {
        Ok(Sink {
            current: RwLock::new(create_producer(kafka, operation_timeout)?),
            kafka: kafka.clone(),
            operation_timeout,
        })
    }

    /// The producer to hand the next batch to.
    pub fn producer(&self) -> Producer {
        match self.current.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After a failed batch: when `used` has hit a fatal error, or `broken` says the
    /// brokers no longer accept its producer id (fenced, unknown id, epoch or sequence
    /// errors), replaces it with a new producer, once, whoever asks first. Returns why.
    pub fn renew_if_broken(&self, used: &Producer, broken: Option<&str>) -> Option<String> {
        let why = match (used.client().fatal_error(), broken) {
            (Some((code, why)), _) => format!("fatal {code:?}: {why}"),
            (None, Some(b)) => b.to_string(),
            (None, None) => return None,
        };
        let mut current = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if current.client().native_ptr() == used.client().native_ptr() {
            match create_producer(&self.kafka, self.operation_timeout) {
                Ok(p) => {
                    *current = p;
                    warn!(reason = %why, "kafka producer replaced with a new one");
                }
                Err(e) => {
                    error!(error = %e, reason = %why, "kafka producer is broken and a new one cannot be created")
                }
            }
        }
        Some(why)
    }
}

/// Errors after which the producer's id or sequence is no longer accepted: only a new
/// producer (a new producer id) gets through.
pub fn breaks_producer(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::UnknownProducerId
                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                | RDKafkaErrorCode::InvalidProducerIdMapping
        )
    )
}

fn create_producer(
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

/// The fields of a record, borrowed from its row.
pub struct Record<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Key: the aggregate id.
    pub key: &'a str,
    /// Value: the payload's JSON text; `None` is a tombstone.
    pub payload: Option<&'a str>,
    /// Headers.
    pub headers: OwnedHeaders,
}

/// Turns a row into a record, or says why the row can never become one.
pub fn build_record<'a>(
    event: &'a Event,
    source: &'a str,
    default_topic: &'a str,
    event_id: &'a str,
) -> Result<Record<'a>, Failure> {
    let topic = event.topic.as_deref().unwrap_or(default_topic);
    if event.topic.is_some() {
        validate_topic(topic).map_err(|e| Failure {
            blame: Blame::Permanent,
            reason: "invalid_topic",
            message: format!("invalid topic name in the row's topic column: {e}"),
        })?;
    }
    let extra: HeaderPairs = match event.headers.as_deref() {
        None => Vec::new(),
        Some(text) => parse_headers(text).map_err(Failure::invalid_record)?,
    };
    let mut headers = OwnedHeaders::new_with_capacity(6 + extra.len())
        .insert(Header {
            key: "event_id",
            value: Some(event_id),
        })
        .insert(Header {
            key: "event_type",
            value: Some(event.event_type.as_str()),
        })
        .insert(Header {
            key: "aggregate_type",
            value: Some(event.aggregate_type.as_str()),
        })
        .insert(Header {
            key: "source",
            value: Some(source),
        });
    if let Some(c) = &event.correlation_id {
        headers = headers.insert(Header {
            key: "correlation_id",
            value: Some(c.as_str()),
        });
    }
    if let Some(t) = &event.idempotency_token {
        headers = headers.insert(Header {
            key: "idempotency_token",
            value: Some(t.as_str()),
        });
    }
    for (k, v) in &extra {
        headers = headers.insert(Header {
            key: k.as_ref(),
            value: Some(v.as_ref()),
        });
    }
    Ok(Record {
        topic,
        key: &event.aggregate_id,
        payload: event.payload.as_deref(),
        headers,
    })
}

/// The row's extra headers, in key order.
type HeaderPairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// A JSON string, borrowed from the row unless it has escapes.
#[derive(serde::Deserialize, PartialEq, Eq, PartialOrd, Ord)]
struct JsonText<'a>(#[serde(borrow)] Cow<'a, str>);

/// Parses the row's `headers`: a JSON object whose values are strings.
fn parse_headers(text: &str) -> Result<HeaderPairs<'_>, String> {
    // The common case borrows from the row; only a bad value takes the slow path, for
    // its error message.
    if let Ok(map) = serde_json::from_str::<BTreeMap<JsonText, JsonText>>(text) {
        return Ok(map.into_iter().map(|(k, v)| (k.0, v.0)).collect());
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("headers column is not JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(format!(
            "headers column must be a JSON object of string values, got {}",
            kind(&value)
        ));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((Cow::Owned(k), Cow::Owned(s))),
            other => Err(format!(
                "headers column: value of {k:?} must be a string, got {}",
                kind(&other)
            )),
        })
        .collect()
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn event() -> Event {
        Event {
            id: 7,
            event_id: uuid::Uuid::nil(),
            aggregate_type: "customer".into(),
            aggregate_id: "c-1".into(),
            event_type: "CustomerCreated".into(),
            payload: Some("{\"a\": 1}".into()),
            topic: None,
            headers: Some("{\"traceparent\": \"00-abc\"}".into()),
            correlation_id: Some("corr".into()),
            idempotency_token: None,
            created_at: std::time::SystemTime::UNIX_EPOCH,
            retry_count: 0,
            max_retries: 3,
        }
    }

    #[test]
    fn records_carry_the_contract_headers() {
        let e = event();
        let id = e.event_id.to_string();
        let r = build_record(&e, "customer", "customer.events", &id).unwrap();
        assert_eq!(r.topic, "customer.events");
        assert_eq!(r.key, "c-1");
        assert_eq!(r.payload, Some("{\"a\": 1}"));
        let names: Vec<_> = r.headers.iter().map(|h| h.key.to_string()).collect();
        assert_eq!(
            names,
            [
                "event_id",
                "event_type",
                "aggregate_type",
                "source",
                "correlation_id",
                "traceparent"
            ]
        );
    }

    #[test]
    fn header_values_with_escapes_are_decoded() {
        let mut e = event();
        e.headers = Some(r#"{"b": "say \"hi\"", "a": "caf\u00e9"}"#.into());
        let r = build_record(&e, "customer", "customer.events", "id").expect("record");
        let extra: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|h| h.key.len() == 1)
            .map(|h| {
                let v = h.value.map(|v| String::from_utf8_lossy(v).into_owned());
                (h.key.to_string(), v.unwrap_or_default())
            })
            .collect();
        assert_eq!(
            extra,
            vec![
                ("a".to_string(), "caf\u{e9}".to_string()),
                ("b".to_string(), "say \"hi\"".to_string())
            ]
        );
    }

    #[test]
    fn rows_that_cannot_become_records_are_permanent_failures() {
        let mut e = event();
        e.headers = Some("[1,2]".into());
        let id = String::new();
        let f = build_record(&e, "s", "t", &id).err().unwrap();
        assert_eq!(f.blame, Blame::Permanent);
        assert!(f.message.contains("JSON object"), "{}", f.message);

        let mut e = event();
        e.headers = Some("{\"n\": 1}".into());
        let f = build_record(&e, "s", "t", &id).err().unwrap();
        assert!(f.message.contains("must be a string"), "{}", f.message);

        let mut e = event();
        e.topic = Some("no spaces allowed".into());
        let f = build_record(&e, "s", "t", &id).err().unwrap();
        assert_eq!((f.blame, f.reason), (Blame::Permanent, "invalid_topic"));
    }

    #[test]
    fn errors_are_classified_by_who_is_to_blame() {
        let c = |code| classify(&KafkaError::MessageProduction(code));
        assert_eq!(
            c(RDKafkaErrorCode::MessageSizeTooLarge).blame,
            Blame::Permanent
        );
        assert_eq!(c(RDKafkaErrorCode::InvalidTopic).blame, Blame::Permanent);
        assert_eq!(c(RDKafkaErrorCode::AllBrokersDown).blame, Blame::Transport);
        assert_eq!(c(RDKafkaErrorCode::MessageTimedOut).blame, Blame::Transport);
        assert_eq!(
            c(RDKafkaErrorCode::NotLeaderForPartition).blame,
            Blame::Transport
        );
        assert_eq!(
            c(RDKafkaErrorCode::TopicAuthorizationFailed).blame,
            Blame::Transport
        );
        assert_eq!(
            c(RDKafkaErrorCode::UnknownTopicOrPartition).blame,
            Blame::Retry
        );
        assert_eq!(c(RDKafkaErrorCode::PolicyViolation).blame, Blame::Retry);
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::PolicyViolation,
        ] {
            assert!(FAILURE_REASONS.contains(&c(code).reason));
        }
    }
}
