//! The downstream consumer: reads every partition of the four topics from the beginning
//! and checks each record against the ledger: rolled back or not, first arrival or
//! duplicate, in its aggregate's order or not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use uuid::Uuid;

use crate::ledger::{AggregateLog, Arrival, Ledger};
use crate::{Service, SERVICES};

/// Examples of order violations kept for the summary.
const MAX_EXAMPLES: usize = 5;

/// A consumer running on its own thread (librdkafka's poll blocks).
pub struct Consumer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(), String>>,
}

impl Consumer {
    /// Assigns every partition of the four topics, from the beginning, and starts reading.
    pub fn start(brokers: &str, partitions: i32, ledger: Arc<Ledger>) -> Result<Consumer> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "outbox-demo-verifier")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "100")
            .create()
            .context("create the Kafka consumer")?;
        let mut assignment = TopicPartitionList::new();
        for s in SERVICES {
            for p in 0..partitions {
                assignment
                    .add_partition_offset(s.topic(), p, Offset::Beginning)
                    .context("assign partitions")?;
            }
        }
        consumer.assign(&assignment).context("assign partitions")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("demo-consumer".into())
            .spawn(move || read_until(consumer, &ledger, &flag))
            .context("start the consumer thread")?;
        Ok(Consumer { stop, thread })
    }

    /// Stops reading; an error when the consumer failed on its way.
    pub async fn stop(self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| format!("consumer thread: {e}"))?
            .map_err(|_| "consumer thread panicked".to_string())?
    }
}

fn read_until(consumer: BaseConsumer, ledger: &Ledger, stop: &AtomicBool) -> Result<(), String> {
    let mut aggregates: Vec<HashMap<String, AggregateLog>> =
        SERVICES.iter().map(|_| HashMap::new()).collect();
    let mut errors = 0u64;
    let mut last_error = String::new();
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(m)) => check(&m, ledger, &mut aggregates),
            Some(Err(e)) => {
                errors += 1;
                last_error = e.to_string();
            }
        }
    }
    if errors > 0 {
        return Err(format!(
            "the consumer saw {errors} errors; last: {last_error}"
        ));
    }
    Ok(())
}

/// Checks one record against the ledger and its aggregate's history.
fn check(
    m: &BorrowedMessage<'_>,
    ledger: &Ledger,
    aggregates: &mut [HashMap<String, AggregateLog>],
) {
    let Some(service) = Service::by_topic(m.topic()) else {
        return;
    };
    let c = ledger.service(service);
    c.received.fetch_add(1, Ordering::Relaxed);
    let event_id = header(m, "event_id").and_then(|s| Uuid::parse_str(s).ok());
    if event_id.is_some_and(|id| ledger.was_rolled_back(&id)) {
        c.rolled_back_seen.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
    let aggregate_type = header(m, "aggregate_type");
    let version = m
        .payload()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
    let (Some(_), Some(key), Some(aggregate_type), Some(version)) =
        (event_id, key, aggregate_type, version)
    else {
        c.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let aggregate = format!("{aggregate_type}/{key}");
    let log = aggregates[service.index()]
        .entry(aggregate.clone())
        .or_default();
    let highest_before = log.highest();
    match log.record(version) {
        Arrival::InOrder => {
            c.distinct.fetch_add(1, Ordering::Relaxed);
        }
        Arrival::OutOfOrder => {
            c.distinct.fetch_add(1, Ordering::Relaxed);
            c.out_of_order.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut ex) = ledger.out_of_order_examples.lock() {
                if ex.len() < MAX_EXAMPLES {
                    ex.push(format!(
                        "{}: {aggregate} version {version} arrived after version {highest_before}",
                        service.name()
                    ));
                }
            }
        }
        Arrival::Duplicate => {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn header<'a>(m: &'a BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    let headers = m.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}
