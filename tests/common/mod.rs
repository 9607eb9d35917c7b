//! Shared integration-test harness: throwaway real servers, never fakes.
//!
//! One module per thing a test starts or reads:
//!
//! * [`postgres`]: [`PgServer`], a private PostgreSQL cluster per test.
//! * [`broker`]: Kafka: the tansu [`Broker`] process, librdkafka's mock cluster
//!   ([`broker::mock`]), [`Kafka`] for either, [`create_topic`], [`consume`],
//!   [`broker::produce_one`].
//! * [`outbox`]: a test's [`TestSource`] (its own schema and topic), writing events,
//!   counting rows, auditing what consumers received.
//! * [`relay`]: the relay's configuration built with setters ([`RelayConfig`]) and the
//!   relay running in this process ([`TestRelay`]).
//! * [`scenario`]: the fixture that puts these together ([`Scenario`]).
//! * [`wait`]: [`eventually`], the one way to wait for a condition.
//! * [`metrics`]: [`Metrics`], reading `/metrics`; [`http`]: a GET for the relay's endpoints.
//! * [`pgbouncer`]: [`pgbouncer::PgBouncer`], the pooler in front of a test's server.
//! * [`process`]: names, free ports, scratch directories and watchdogs the servers share.
//!
//! The server helpers are *blocking*. From a `#[tokio::test]` that also runs code under
//! test on the same runtime, use `flavor = "multi_thread"`, or call the slow ones
//! (`consume`, `Broker::start`, ...) through `tokio::task::spawn_blocking` or their async
//! forms ([`consume_async`], [`Scenario::consume`]); otherwise a current-thread runtime is
//! starved while the helper blocks.
//!
//! Leak protection: every server gets a watchdog `sh` process that blocks reading a pipe
//! whose only writer is this test process. When the test process goes away for any reason
//! (normal exit, panic=abort, SIGKILL), the pipe hits EOF and the watchdog kills the
//! server and removes its files. `Drop` does the same eagerly and disarms the watchdog.
#![allow(dead_code)]

pub mod broker;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod pgbouncer;
pub mod postgres;
pub mod process;
pub mod relay;
pub mod scenario;
pub mod wait;

// What most tests use, at the top; each test binary uses only some of it.
#[allow(unused_imports)]
pub use self::{
    broker::{consume, consume_async, create_topic, Broker, Kafka, Received},
    metrics::Metrics,
    outbox::{audit, header, TestSource},
    postgres::{chown_to_pg, connect, PgServer},
    process::{free_port, unique_name},
    relay::{RelayConfig, TestRelay},
    scenario::{Scenario, DEADLINE},
    wait::{eventually, eventually_blocking},
};
