//! The fixture every relay test starts from: a PostgreSQL server with the test's sources
//! (each its own schema and topic, in one or more databases), a broker with their topics,
//! the relay's configuration for them, migrated, and, if asked, the relay running.
//!
//! ```ignore
//! let (sc, mut relay) = Scenario::builder().source("orders").partitions(3)
//!     .set("batch_size", 50).start().await;
//! sc.insert_events(sc.src(), 100, 7, 0);
//! let got = sc.consume(&sc.src().topic, 100).await;
//! ```

use std::time::Duration;

use outbox_relay::config::Settings;
use toml::Value;

use super::broker::{consume, consume_async, mock, Broker, Kafka, Received};
use super::outbox::{self, TestSource};
use super::postgres::PgServer;
use super::process::free_port;
use super::relay::{RelayConfig, TestRelay};
use super::wait::{eventually, eventually_blocking};

/// How long a scenario's waits (consume, outbox empty) take at most, unless set.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Which broker a scenario starts.
#[derive(Debug, Clone, Copy)]
enum BrokerKind {
    Mock,
    Tansu,
    None,
}

/// How a source of the scenario is made.
#[derive(Debug, Clone)]
struct SourcePlan {
    db: String,
    /// A prefix of a fresh name, or the name itself.
    name: String,
    named: bool,
    /// Its database URL points at a port nobody listens on; never migrated.
    unreachable: bool,
}

/// Options of a [`Scenario`]; see the module docs.
#[must_use]
pub struct ScenarioBuilder {
    sources: Vec<SourcePlan>,
    broker: BrokerKind,
    partitions: i32,
    config: RelayConfig,
    deadline: Duration,
}

/// A running PostgreSQL and broker, the test's sources and the relay's configuration.
pub struct Scenario {
    pub pg: PgServer,
    pub kafka: Kafka,
    pub sources: Vec<TestSource>,
    /// What [`Scenario::settings`] and [`Scenario::start_relay`] use; change it freely.
    pub config: RelayConfig,
    pub deadline: Duration,
    unreachable: Vec<String>,
}

impl Scenario {
    /// No sources yet, librdkafka's mock cluster with one partition per topic.
    pub fn builder() -> ScenarioBuilder {
        ScenarioBuilder {
            sources: Vec::new(),
            broker: BrokerKind::Mock,
            partitions: 1,
            config: RelayConfig::default(),
            deadline: DEADLINE,
        }
    }
}

impl ScenarioBuilder {
    fn plan(mut self, db: &str, name: &str, named: bool, unreachable: bool) -> Self {
        self.sources.push(SourcePlan {
            db: db.into(),
            name: name.into(),
            named,
            unreachable,
        });
        self
    }

    /// A source with a fresh schema named after `prefix`, in database `postgres`.
    pub fn source(self, prefix: &str) -> Self {
        self.plan("postgres", prefix, false, false)
    }

    /// A source with a fresh schema named after `prefix`, in database `db` (created unless
    /// it is `postgres`).
    pub fn source_in(self, db: &str, prefix: &str) -> Self {
        self.plan(db, prefix, false, false)
    }

    /// A source called exactly `name`, with a fresh schema, in database `db`.
    pub fn named_source_in(self, db: &str, name: &str) -> Self {
        self.plan(db, name, true, false)
    }

    /// A source whose database nobody listens on (a free port); it is not migrated.
    pub fn unreachable_source(self, prefix: &str) -> Self {
        self.plan("postgres", prefix, false, true)
    }

    /// Partitions of every source's topic (default 1).
    pub fn partitions(mut self, n: i32) -> Self {
        self.partitions = n;
        self
    }

    /// A tansu broker process instead of the mock cluster.
    pub fn tansu(mut self) -> Self {
        self.broker = BrokerKind::Tansu;
        self
    }

    /// No broker at all (the relay's brokers point at a closed port), no topics.
    pub fn no_broker(mut self) -> Self {
        self.broker = BrokerKind::None;
        self
    }

    /// A relay setting: see [`RelayConfig::set`].
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> Self {
        self.config = self.config.set(path, value);
        self
    }

    /// How long the scenario's waits take at most (default [`DEADLINE`]).
    pub fn deadline(mut self, d: Duration) -> Self {
        self.deadline = d;
        self
    }

    /// Starts PostgreSQL (creating the sources' databases) and the broker (creating the
    /// sources' topics) and writes the configuration; migrates nothing. Blocking.
    pub fn build(self) -> Scenario {
        let pg = PgServer::start();
        let mut dbs: Vec<&str> = self.sources.iter().map(|p| p.db.as_str()).collect();
        dbs.sort_unstable();
        dbs.dedup();
        for db in dbs.into_iter().filter(|db| *db != "postgres") {
            pg.create_database(db);
        }
        let mut unreachable = Vec::new();
        let sources: Vec<TestSource> = self
            .sources
            .iter()
            .map(|p| {
                let mut src = if p.named {
                    TestSource::named(&pg, &p.db, &p.name)
                } else {
                    TestSource::new(&pg, &p.db, &p.name)
                };
                if p.unreachable {
                    src.url = format!("postgres://postgres@127.0.0.1:{}/{}", free_port(), p.db);
                    unreachable.push(src.name.clone());
                }
                src
            })
            .collect();
        let topics: Vec<&str> = sources.iter().map(|s| s.topic.as_str()).collect();
        let kafka = match self.broker {
            BrokerKind::Mock => Kafka::Mock(mock(&topics, self.partitions)),
            BrokerKind::Tansu => {
                let kafka = Kafka::Tansu(Broker::start());
                for t in &topics {
                    kafka.create_topic(t, self.partitions);
                }
                kafka
            }
            BrokerKind::None => Kafka::None,
        };
        let config = sources.iter().fold(
            self.config.set("kafka.brokers", kafka.bootstrap()),
            RelayConfig::source,
        );
        Scenario {
            pg,
            kafka,
            sources,
            config,
            deadline: self.deadline,
            unreachable,
        }
    }

    /// [`ScenarioBuilder::build`], then the migrations applied to every reachable source.
    pub async fn migrated(self) -> Scenario {
        let sc = self.build();
        sc.migrate().await;
        sc
    }

    /// [`ScenarioBuilder::migrated`], then a relay started with the configuration.
    pub async fn start(self) -> (Scenario, TestRelay) {
        let sc = self.migrated().await;
        let relay = sc.start_relay().await;
        (sc, relay)
    }
}

impl Scenario {
    /// The first source.
    pub fn src(&self) -> &TestSource {
        self.sources.first().expect("a scenario with a source")
    }

    /// The relay's settings from [`Scenario::config`].
    pub fn settings(&self) -> Settings {
        self.config.settings()
    }

    /// Applies the migrations to every source but the unreachable ones.
    pub async fn migrate(&self) {
        let settings = self.settings();
        for source in &settings.sources {
            if self.unreachable.contains(&source.name) {
                continue;
            }
            outbox_relay::migrate::migrate_source(source, settings.operation_timeout)
                .await
                .unwrap_or_else(|e| panic!("migrate {}: {e:#}", source.name));
        }
    }

    /// A relay in this process with [`Scenario::settings`].
    pub async fn start_relay(&self) -> TestRelay {
        TestRelay::start(self.settings()).await
    }

    /// The brokers, as the relay's `kafka.brokers` names them.
    pub fn bootstrap(&self) -> String {
        self.kafka.bootstrap()
    }

    /// Reads `topic` until `expected` records arrived (or the scenario's deadline passed),
    /// then a little longer for duplicates.
    pub async fn consume(&self, topic: &str, expected: usize) -> Vec<Received> {
        consume_async(&self.bootstrap(), topic, expected, self.deadline).await
    }

    /// [`Scenario::consume`] for blocking tests.
    pub fn consume_blocking(&self, topic: &str, expected: usize) -> Vec<Received> {
        consume(&self.bootstrap(), topic, expected, self.deadline)
    }

    /// Inserts `n` events into `src`'s outbox: see [`outbox::insert_events`].
    pub fn insert_events(&self, src: &TestSource, n: usize, aggregates: usize, first_seq: usize) {
        outbox::insert_events(&self.pg, src, n, aggregates, first_seq);
    }

    /// Rows left in `src`'s outbox.
    pub fn outbox_rows(&self, src: &TestSource) -> i64 {
        outbox::outbox_rows(&self.pg, src)
    }

    /// Rows in `src`'s dead-letter table.
    pub fn dead_letter_rows(&self, src: &TestSource) -> i64 {
        outbox::dead_letter_rows(&self.pg, src)
    }

    /// Waits until `src`'s outbox is empty.
    pub async fn wait_outbox_empty(&self, src: &TestSource) {
        eventually(
            &format!("{} outbox empty", src.name),
            self.deadline,
            async || self.outbox_left(src),
        )
        .await;
    }

    /// [`Scenario::wait_outbox_empty`] for blocking tests.
    pub fn wait_outbox_empty_blocking(&self, src: &TestSource) {
        eventually_blocking(&format!("{} outbox empty", src.name), self.deadline, || {
            self.outbox_left(src)
        });
    }

    fn outbox_left(&self, src: &TestSource) -> Result<(), String> {
        match self.outbox_rows(src) {
            0 => Ok(()),
            n => Err(format!("{n} rows left in {}.outbox", src.schema)),
        }
    }
}
