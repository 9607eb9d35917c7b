//! Kafka: the sink owns publishing. A source hands it events one batch at a time
//! ([`Sink::outgoing`]) and gets back, per event, delivered or a [`Failure`] with its
//! reason and blame; no librdkafka type leaves this module.
//!
//! - `record.rs`: an event becomes a record (topic, key, payload, headers);
//! - `classify.rs`: what each librdkafka error means, in one table;
//! - `producer.rs`: the producer's settings and log routing.

mod classify;
mod producer;
mod record;

use std::fmt::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use rdkafka::error::KafkaError;
use tracing::{error, warn};

pub use classify::{classify, Blame, Classified, Failure, Reason};
pub use producer::{client_config, Delivery, Producer, RelayContext};
pub use record::{build_record, with_cloudevents, Record};

use crate::config::KafkaSettings;
use crate::event::Event;

/// How long past `message.timeout.ms` a batch waits for its acknowledgements: librdkafka
/// resolves every delivery within that timeout; the margin only guards against a lost
/// callback.
pub const ACK_MARGIN: Duration = Duration::from_secs(5);

/// Every record of a batch, acknowledged or failed, by its index in the batch.
pub type Acks = BoxFuture<'static, Vec<(usize, Result<(), Failure>)>>;

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
            current: RwLock::new(producer::create_producer(kafka, operation_timeout)?),
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

    /// Starts a batch of records for `source`, whose events without a topic of their
    /// own go to `default_topic`.
    /// A batch of `source`'s records; with `cloudevents` (the `ce_source`), in
    /// CloudEvents' binary mode.
    pub fn outgoing(
        self: &Arc<Self>,
        source: Arc<str>,
        default_topic: Arc<str>,
        cloudevents: Option<Arc<str>>,
    ) -> Outgoing {
        Outgoing {
            sink: self.clone(),
            producer: self.producer(),
            source,
            default_topic,
            cloudevents,
            pending: Vec::new(),
            event_id: String::with_capacity(36),
            refused: false,
            broken: None,
        }
    }

    /// Cluster metadata: how many brokers the producer knows, within `timeout`. Blocks.
    pub fn broker_count(&self, timeout: Duration) -> Result<usize, String> {
        self.producer()
            .client()
            .fetch_metadata(None, timeout)
            .map(|m| m.brokers().len())
            .map_err(|e| e.to_string())
    }

    /// Waits up to `timeout` for every record handed over to be acknowledged. Blocks.
    pub fn flush(&self, timeout: Duration) -> bool {
        self.producer().flush(timeout).is_ok()
    }

    /// After a failed batch: when `used` has hit a fatal error, or `broken` says the
    /// brokers no longer accept its producer id (fenced, unknown id, epoch or sequence
    /// errors), replaces it with a new producer, once, whoever asks first. Returns why.
    fn renew_if_broken(&self, used: &Producer, broken: Option<&str>) -> Option<String> {
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
            match producer::create_producer(&self.kafka, self.operation_timeout) {
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

/// One batch being handed to the producer.
pub struct Outgoing {
    sink: Arc<Sink>,
    producer: Producer,
    source: Arc<str>,
    default_topic: Arc<str>,
    /// `ce_source`, when records are CloudEvents.
    cloudevents: Option<Arc<str>>,
    /// Each record handed over: its index in the batch, its delivery, and whether it
    /// went to the row's own topic.
    pending: Vec<(usize, Delivery, bool)>,
    event_id: String,
    /// The producer refused a record at once for the transport's sake: a fatal producer
    /// refuses every record, so it may need replacing even with nothing to wait for.
    refused: bool,
    /// Why the brokers no longer accept the producer's id, when an error said so.
    broken: Option<String>,
}

impl Outgoing {
    /// Hands event `i` of the batch to the producer, or says why it cannot go: a row
    /// that cannot become a record, or a record the producer refuses at once (a full
    /// queue is a transport failure: the caller keeps the rest of the batch back).
    pub fn send(&mut self, i: usize, e: &Event) -> Result<(), Failure> {
        self.event_id.clear();
        let _ = write!(self.event_id, "{}", e.event_id);
        let mut record = build_record(e, &self.source, &self.default_topic, &self.event_id)?;
        if let Some(ce_source) = &self.cloudevents {
            record.headers = with_cloudevents(record.headers, e, &self.event_id, ce_source);
        }
        let payload = record.payload.map(str::as_bytes);
        let own_topic = *record.topic != *self.default_topic;
        match self
            .producer
            .send(record.topic, record.key, payload, record.headers)
        {
            Ok(delivery) => {
                self.pending.push((i, delivery, own_topic));
                Ok(())
            }
            Err(err) => {
                let c = classify(&err).for_topic(own_topic);
                if c.failure.blame() == Blame::Transport {
                    self.refused = true;
                }
                if c.breaks_producer && self.broken.is_none() {
                    self.broken = Some(err.to_string());
                }
                Err(c.failure)
            }
        }
    }

    /// Every record handed over, acknowledged or failed. A record without an answer
    /// within `message.timeout.ms` plus [`ACK_MARGIN`] is a transport failure. After a
    /// transport failure (at once or acknowledged), when the producer has hit a fatal
    /// error or the brokers no longer accept its id, it is replaced before this returns.
    pub fn acks(self) -> Acks {
        let Outgoing {
            sink,
            producer,
            pending,
            refused,
            broken,
            ..
        } = self;
        let deadline = sink.operation_timeout + ACK_MARGIN;
        async move {
            let sent: Vec<usize> = pending.iter().map(|(i, ..)| *i).collect();
            // Awaited one after the other: acknowledgements arrive roughly in send order,
            // so this task wakes about once per produce response, not once per record as
            // a join of a thousand futures would.
            let collect = async move {
                let mut results = Vec::with_capacity(pending.len());
                for (i, delivery, own_topic) in pending {
                    results.push((i, delivery.await, own_topic));
                }
                results
            };
            let Ok(results) = tokio::time::timeout(deadline, collect).await else {
                let f = Failure::transport(format!("no acknowledgement within {deadline:?}"));
                return sent.into_iter().map(|i| (i, Err(f.clone()))).collect();
            };
            let mut broken = broken;
            let mut out: Vec<(usize, Result<(), Failure>)> = results
                .into_iter()
                .map(|(i, r, own_topic)| {
                    let r = match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(err)) => {
                            let c = classify(&err).for_topic(own_topic);
                            if c.breaks_producer && broken.is_none() {
                                broken = Some(err.to_string());
                            }
                            Err(c.failure)
                        }
                        Err(_canceled) => Err(Failure::transport(
                            "the producer dropped the delivery".into(),
                        )),
                    };
                    (i, r)
                })
                .collect();
            let transport =
                |r: &Result<(), Failure>| matches!(r, Err(f) if f.blame() == Blame::Transport);
            if refused || out.iter().any(|(_, r)| transport(r)) {
                // A fenced or otherwise dead producer fails every batch until replaced.
                if let Some(why) = sink.renew_if_broken(&producer, broken.as_deref()) {
                    for (_, r) in out.iter_mut() {
                        if let Err(f) = r {
                            if f.blame() == Blame::Transport {
                                f.message = format!("{} (producer replaced: {why})", f.message);
                            }
                        }
                    }
                }
            }
            out
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;

    #[tokio::test]
    async fn a_fatal_producer_is_replaced_even_when_it_refuses_every_record_at_once() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        let kafka = KafkaSettings {
            brokers: cluster.bootstrap_servers(),
            properties: Default::default(),
        };
        let sink = Arc::new(Sink::new(&kafka, Duration::from_secs(2)).expect("sink"));
        let before = sink.producer();
        // librdkafka's own hook for raising a fatal error on an idempotent producer.
        let code = unsafe {
            rdkafka::bindings::rd_kafka_test_fatal_error(
                before.client().native_ptr(),
                rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
                c"injected by the test".as_ptr(),
            )
        };
        assert_eq!(
            code,
            rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        );
        let mut out = sink.outgoing("s".into(), "t".into(), None);
        let refused = out
            .send(0, &Event::sample(1, "a"))
            .expect_err("a fatal producer takes no record");
        assert_eq!(refused.blame(), Blame::Transport, "{refused:?}");
        assert!(out.acks().await.is_empty(), "nothing was handed over");
        let after = sink.producer();
        assert_ne!(
            before.client().native_ptr(),
            after.client().native_ptr(),
            "the fatal producer is still in use"
        );
        assert!(after.client().fatal_error().is_none());
    }
}
