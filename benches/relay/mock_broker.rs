//! The second broker of the latency runs: librdkafka's mock cluster
//! (`rdkafka::mocking::MockCluster`, one broker, in memory: not a production broker),
//! there to tell the relay's own latency from tansu's. It runs in its own process (this
//! bench binary, re-executed with BENCH_MOCK_BROKER=1), so the relay, the producer and
//! the consumer reach it over TCP as they reach tansu.
//!
//! The child prints its bootstrap address on stdout, then creates topics on request (the
//! mock does not implement CreateTopics): a line `TOPIC PARTITIONS` on its stdin,
//! answered by `ok`. It exits when its stdin closes, so it does not outlive the bench.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use rdkafka::mocking::MockCluster;

const CHILD_ENV: &str = "BENCH_MOCK_BROKER";

/// In the child (BENCH_MOCK_BROKER=1): serves the mock cluster until stdin closes and
/// returns true. In the bench itself: returns false at once.
pub fn serve_if_child() -> bool {
    if std::env::var_os(CHILD_ENV).is_none() {
        return false;
    }
    let mock = MockCluster::new(1).expect("mock broker: create the mock cluster");
    let mut out = std::io::stdout().lock();
    let answer = |out: &mut std::io::StdoutLock, line: &str| {
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .expect("mock broker: write stdout");
    };
    answer(&mut out, &mock.bootstrap_servers());
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("mock broker: read stdin");
        let (topic, partitions) = line
            .rsplit_once(' ')
            .and_then(|(t, p)| Some((t, p.parse().ok()?)))
            .unwrap_or_else(|| panic!("mock broker: {line:?} is not `TOPIC PARTITIONS`"));
        mock.create_topic(topic, partitions, 1)
            .unwrap_or_else(|e| panic!("mock broker: create topic {topic}: {e}"));
        answer(&mut out, "ok");
    }
    true
}

/// The mock broker process, killed on drop.
pub struct MockBroker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    bootstrap: String,
}

impl MockBroker {
    /// Starts the child and waits for its bootstrap address.
    pub fn start() -> MockBroker {
        let exe = std::env::current_exe().expect("the bench's own executable");
        let mut child = Command::new(exe)
            .env(CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the mock broker process");
        let stdin = child.stdin.take().expect("mock broker stdin");
        let stdout = BufReader::new(child.stdout.take().expect("mock broker stdout"));
        let mut broker = MockBroker {
            child,
            stdin,
            stdout,
            bootstrap: String::new(),
        };
        broker.bootstrap = broker.read_line();
        broker
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the mock broker's stdout");
        assert!(
            !line.is_empty(),
            "the mock broker process exited (see its panic above)"
        );
        line.trim_end().to_string()
    }

    pub fn bootstrap(&self) -> String {
        self.bootstrap.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn create_topic(&mut self, topic: &str, partitions: i32) {
        writeln!(self.stdin, "{topic} {partitions}").expect("write to the mock broker");
        let answer = self.read_line();
        assert_eq!(answer, "ok", "mock broker: create topic {topic}");
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
