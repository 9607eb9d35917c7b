//! The Kafka side of the bench: the producer every non-relay contender uses (built by the
//! relay's own `sink::Sink`, so the settings are the relay's), and the consumer at
//! which every rate and latency is measured.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::workload::{contract_headers, BrokerRecord};

/// A producer with the relay's settings, from the same configuration text the relay
/// process gets: the relay's own client configuration (idempotent, acks=all, linger,
/// and the `[kafka.properties]` of config/default.toml, e.g. lz4). The only place the
/// bench depends on the sink's API.
pub fn relay_producer(config_toml: &str) -> FutureProducer {
    let settings = outbox_relay::config::Settings::from_parts(
        Some(config_toml),
        &std::collections::HashMap::new(),
    )
    .unwrap_or_else(|e| panic!("bench config: {e}"));
    outbox_relay::sink::client_config(&settings.kafka, settings.operation_timeout)
        .create()
        .expect("create producer")
}

/// Commit (or send) and receive times of sequence-numbered events, in nanoseconds since
/// `base` (+1, so 0 means "not yet").
pub struct LatencyBook {
    base: Instant,
    sent: Vec<AtomicU64>,
    recv: Vec<AtomicU64>,
    duplicates: AtomicU64,
    strangers: AtomicU64,
}

impl LatencyBook {
    pub fn new(events: u64) -> LatencyBook {
        LatencyBook {
            base: Instant::now(),
            sent: (0..events).map(|_| AtomicU64::new(0)).collect(),
            recv: (0..events).map(|_| AtomicU64::new(0)).collect(),
            duplicates: AtomicU64::new(0),
            strangers: AtomicU64::new(0),
        }
    }

    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64 + 1
    }

    pub fn mark_sent(&self, seq: u64, at: Instant) {
        self.sent[seq as usize].store(self.stamp(at), Ordering::Relaxed);
    }

    fn mark_received(&self, seq: u64, at: Instant) {
        let Some(slot) = self.recv.get(seq as usize) else {
            self.strangers.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if slot
            .compare_exchange(0, self.stamp(at), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Latencies of `seqs` (ms), sorted, and how many of them never arrived.
    pub fn latencies_ms(&self, seqs: std::ops::Range<u64>) -> (Vec<f64>, u64) {
        let mut out = Vec::with_capacity((seqs.end - seqs.start) as usize);
        let mut missing = 0;
        for seq in seqs {
            let s = self.sent[seq as usize].load(Ordering::Relaxed);
            let r = self.recv[seq as usize].load(Ordering::Relaxed);
            if s == 0 || r == 0 {
                missing += 1;
                continue;
            }
            out.push(r.saturating_sub(s) as f64 / 1e6);
        }
        out.sort_by(|a, b| a.total_cmp(b));
        (out, missing)
    }

    pub fn duplicates(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }
}

/// A consumer thread reading a topic from the beginning of every partition, counting
/// records, noting when the count reached `target`, and (with a book) the receive time
/// of every `bench_seq`-stamped record.
pub struct CountingConsumer {
    count: Arc<AtomicU64>,
    /// Records read before the measured ones (a sentinel): `first` is the next one's time.
    base: Arc<AtomicU64>,
    first: Arc<Mutex<Option<Instant>>>,
    reached: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// The consumer's `fetch.wait.max.ms` in drains (latency runs: `BrokerKind::fetch_wait_ms`).
pub const DRAIN_FETCH_WAIT_MS: u32 = 10;

/// A consumer's `fetch.wait.max.ms`: BENCH_FETCH_WAIT_MS, else the caller's choice.
pub fn fetch_wait_ms(chosen: u32) -> String {
    std::env::var("BENCH_FETCH_WAIT_MS").unwrap_or_else(|_| chosen.to_string())
}

/// Consumer settings: no group, nothing committed. Both brokers (tansu and librdkafka's
/// mock cluster) answer a fetch for an empty partition only after `fetch.wait.max.ms`,
/// even when records arrive meanwhile, so that wait adds to the latency the consumer
/// sees; shorter waits cost the broker CPU the relay then lacks.
fn consumer_config(bootstrap: &str, chosen_wait_ms: u32) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-relay-bench")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", fetch_wait_ms(chosen_wait_ms))
        .set("allow.auto.create.topics", "false");
    c
}

impl CountingConsumer {
    /// Starts reading and returns once the first fetch round has been made.
    pub fn start(
        bootstrap: &str,
        topic: &str,
        partitions: i32,
        target: u64,
        book: Option<Arc<LatencyBook>>,
        fetch_wait_ms: u32,
    ) -> CountingConsumer {
        let consumer: BaseConsumer = consumer_config(bootstrap, fetch_wait_ms)
            .create()
            .expect("create consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("add partition");
        }
        consumer.assign(&tpl).expect("assign partitions");
        let count = Arc::new(AtomicU64::new(0));
        let base = Arc::new(AtomicU64::new(0));
        let first = Arc::new(Mutex::new(None));
        let reached = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let ready = Arc::new(AtomicBool::new(false));
        let handle = {
            let (count, base, first, reached, stop, ready) = (
                count.clone(),
                base.clone(),
                first.clone(),
                reached.clone(),
                stop.clone(),
                ready.clone(),
            );
            let topic = topic.to_string();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let polled = consumer.poll(Duration::from_millis(50));
                    ready.store(true, Ordering::Relaxed);
                    match polled {
                        Some(Ok(m)) => {
                            let now = Instant::now();
                            if let (Some(book), Some(hs)) = (&book, m.headers()) {
                                if let Some(seq) = hs
                                    .iter()
                                    .find(|h| h.key == "bench_seq")
                                    .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                                {
                                    book.mark_received(seq, now);
                                }
                            }
                            let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                            if n == base.load(Ordering::Relaxed) + 1 {
                                *first.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
                            }
                            if n == target {
                                *reached.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
                            }
                        }
                        Some(Err(e)) => eprintln!("bench consumer ({topic}): {e}"),
                        None => {}
                    }
                }
            })
        };
        let end = Instant::now() + Duration::from_secs(30);
        while !ready.load(Ordering::Relaxed) {
            assert!(
                Instant::now() < end,
                "consumer of {topic} did not start within 30s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        CountingConsumer {
            count,
            base,
            first,
            reached,
            stop,
            handle: Some(handle),
        }
    }

    /// Counts the records read so far as before the measured ones.
    pub fn set_base(&self) {
        self.base.store(self.count(), Ordering::Relaxed);
    }

    /// When the first measured record arrived.
    pub fn first_at(&self) -> Option<Instant> {
        *self.first.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits until the target count arrived (returns when it did) or `deadline` passed.
    pub async fn wait_target(&self, deadline: Duration) -> Option<Instant> {
        let end = Instant::now() + deadline;
        loop {
            if let Some(at) = *self.reached.lock().unwrap_or_else(|e| e.into_inner()) {
                return Some(at);
            }
            if Instant::now() >= end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until at least `n` records arrived or `deadline` passed; returns the count.
    pub async fn wait_count(&self, n: u64, deadline: Duration) -> u64 {
        let end = Instant::now() + deadline;
        while self.count() < n && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.count()
    }
}

impl Drop for CountingConsumer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Produces one record that is not an event and waits for its ack: once a consumer
/// has read it, the consumer is fetching, so its start-up is out of what is measured.
pub async fn send_sentinel<C: ClientContext + 'static>(producer: &FutureProducer<C>, topic: &str) {
    let record = FutureRecord::to(topic).key("bench-sentinel").payload("{}");
    if let Err((e, _)) = producer.send(record, Duration::from_secs(30)).await {
        panic!("sentinel record to {topic}: {e}");
    }
}

/// Produces every record as fast as the producer takes them and waits for all
/// acknowledgements. Returns the time from the first send to the last ack.
pub async fn produce_all<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
    records: &[BrokerRecord],
) -> Duration {
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    for r in records {
        loop {
            let headers = contract_headers(
                &r.event_id,
                &r.event_type,
                &r.aggregate_type,
                "bench",
                &r.headers,
            );
            let record = FutureRecord::to(topic)
                .key(&r.key)
                .payload(&r.payload)
                .headers(headers);
            match producer.send_result(record) {
                Ok(f) => {
                    acks.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The producer's queue is full: let some acknowledgements in.
                    match tokio::time::timeout(Duration::from_secs(30), acks.next()).await {
                        Ok(Some(Ok(Ok(_)))) => {}
                        other => panic!("broker limit: delivery failed: {other:?}"),
                    }
                }
                Err((e, _)) => panic!("broker limit: produce failed: {e}"),
            }
        }
    }
    let end = Instant::now() + Duration::from_secs(120);
    while let Some(r) =
        tokio::time::timeout(end.saturating_duration_since(Instant::now()), acks.next())
            .await
            .expect("broker limit: acknowledgements within 120s")
    {
        if !matches!(r, Ok(Ok(_))) {
            panic!("broker limit: delivery failed: {r:?}");
        }
    }
    started.elapsed()
}
