//! Turning an outbox row into a Kafka record: topic, key, payload and the contract's
//! headers, or why the row can never become one.

use std::borrow::Cow;
use std::collections::BTreeMap;

use rdkafka::message::{Header, OwnedHeaders};

use crate::config::validate_topic;
use crate::event::{Defect, Event};
use crate::sink::{Failure, Reason};

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
    match &event.defect {
        None => {}
        Some(Defect::Unreadable(why)) => return Err(Failure::invalid_record(why.clone())),
        Some(Defect::TooLarge(why)) => {
            return Err(Failure {
                reason: Reason::MessageTooLarge,
                message: why.clone(),
            })
        }
    }
    let topic = event.topic.as_deref().unwrap_or(default_topic);
    if event.topic.is_some() {
        validate_topic(topic).map_err(|e| Failure {
            reason: Reason::InvalidTopic,
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

/// Adds CloudEvents' Kafka protocol binding (binary mode) to a record's headers: the
/// event's id, type, source, time and subject; `content-type` when it has a value.
pub fn with_cloudevents(
    headers: OwnedHeaders,
    event: &Event,
    event_id: &str,
    ce_source: &str,
) -> OwnedHeaders {
    let time = humantime::format_rfc3339_micros(event.created_at).to_string();
    let mut headers = headers
        .insert(Header {
            key: "ce_specversion",
            value: Some("1.0"),
        })
        .insert(Header {
            key: "ce_id",
            value: Some(event_id),
        })
        .insert(Header {
            key: "ce_type",
            value: Some(event.event_type.as_str()),
        })
        .insert(Header {
            key: "ce_source",
            value: Some(ce_source),
        })
        .insert(Header {
            key: "ce_time",
            value: Some(time.as_str()),
        })
        .insert(Header {
            key: "ce_subject",
            value: Some(event.aggregate_id.as_str()),
        });
    if event.payload.is_some() {
        headers = headers.insert(Header {
            key: "content-type",
            value: Some("application/json"),
        });
    }
    headers
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
    use crate::sink::Blame;
    use rdkafka::message::Headers;

    fn event() -> Event {
        Event {
            id: 7,
            aggregate_type: "customer".into(),
            aggregate_id: "c-1".into(),
            event_type: "CustomerCreated".into(),
            payload: Some("{\"a\": 1}".into()),
            headers: Some("{\"traceparent\": \"00-abc\"}".into()),
            correlation_id: Some("corr".into()),
            ..Event::sample(7, "c-1")
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
    fn cloudevents_records_carry_the_binding_headers_besides_the_contracts() {
        let e = event();
        let id = e.event_id.to_string();
        let r = build_record(&e, "customer", "customer.events", &id).unwrap();
        let h = with_cloudevents(r.headers, &e, &id, "/outbox-relay/customer");
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("ce_specversion").as_deref(), Some("1.0"));
        assert_eq!(get("ce_id"), Some(id.clone()));
        assert_eq!(get("ce_type").as_deref(), Some("CustomerCreated"));
        assert_eq!(get("ce_source").as_deref(), Some("/outbox-relay/customer"));
        assert_eq!(get("ce_subject").as_deref(), Some("c-1"));
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        let time = get("ce_time").unwrap();
        assert_eq!(humantime::parse_rfc3339(&time).unwrap(), {
            let us = e
                .created_at
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros();
            std::time::UNIX_EPOCH + std::time::Duration::from_micros(us as u64)
        });
        assert_eq!(get("event_id"), Some(id), "the contract's headers stay");
        assert_eq!(get("traceparent").as_deref(), Some("00-abc"));
    }

    #[test]
    fn rows_that_cannot_become_records_are_permanent_failures() {
        let mut e = event();
        e.headers = Some("[1,2]".into());
        let id = String::new();
        let f = build_record(&e, "s", "t", &id).err().unwrap();
        assert_eq!(f.blame(), Blame::Permanent);
        assert!(f.message.contains("JSON object"), "{}", f.message);

        let mut e = event();
        e.headers = Some("{\"n\": 1}".into());
        let f = build_record(&e, "s", "t", &id).err().unwrap();
        assert!(f.message.contains("must be a string"), "{}", f.message);

        let mut e = event();
        e.topic = Some("no spaces allowed".into());
        let f = build_record(&e, "s", "t", &id).err().unwrap();
        assert_eq!(f.reason, Reason::InvalidTopic);
    }
}
