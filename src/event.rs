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
    /// Why the row cannot become a record, found while reading it: it is dead-lettered
    /// at once, without being sent.
    pub defect: Option<Defect>,
}

/// A row the relay read but cannot send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Defect {
    /// A column is NULL where the contract needs a value, or of a type the relay cannot
    /// read: the message names the column.
    Unreadable(String),
    /// The payload is larger than the producer may send; it was not read.
    TooLarge(String),
}

impl Event {
    /// The W3C trace id of the row's `traceparent` header, for log lines about the
    /// event (`00-<trace id>-<parent id>-<flags>`).
    pub fn trace_id(&self) -> Option<&str> {
        let headers = self.headers.as_deref()?;
        let at = headers.find("\"traceparent\"")?;
        let rest = &headers[at + "\"traceparent\"".len()..];
        let value = rest
            .trim_start()
            .strip_prefix(':')?
            .trim_start()
            .strip_prefix('"')?;
        let id = value.split('-').nth(1)?;
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }
}

#[cfg(test)]
impl Event {
    /// An event of aggregate `order`/`aggregate_id` with nothing optional set, written
    /// now, never tried: what the unit tests start from.
    pub(crate) fn sample(id: i64, aggregate_id: &str) -> Event {
        Event {
            id,
            event_id: Uuid::nil(),
            aggregate_type: "order".into(),
            aggregate_id: aggregate_id.into(),
            event_type: "OrderPlaced".into(),
            payload: None,
            topic: None,
            headers: None,
            correlation_id: None,
            idempotency_token: None,
            created_at: SystemTime::now(),
            retry_count: 0,
            max_retries: 3,
            defect: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Event;

    #[test]
    fn the_trace_id_comes_from_the_traceparent_header() {
        let mut e = Event::sample(1, "a");
        assert_eq!(e.trace_id(), None);
        e.headers = Some(
            r#"{"tracestate": "k=v", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#
                .into(),
        );
        assert_eq!(e.trace_id(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        e.headers = Some(r#"{"traceparent": "garbage"}"#.into());
        assert_eq!(e.trace_id(), None);
    }
}
