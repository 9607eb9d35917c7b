//! What the pipeline asks of the world ([`Ports`]: PostgreSQL's claims and settles,
//! Kafka's hand-over), and what it hands back.

use futures::future::BoxFuture;

use super::Settlement;
use crate::config::RetrySettings;
use crate::db::DbError;
use crate::event::Event;
use crate::sink::{Acks, Failure};

/// What the pipeline asks of PostgreSQL and Kafka.
pub trait Ports: Send + Sync {
    /// One batch being handed to Kafka.
    type Batch: Handover;
    /// Claims the next batch of at most `limit` rows, leaving out `exclude` (the ids the
    /// pipeline holds). Runs on its own task, so PostgreSQL reads while the pipeline
    /// hands a batch over.
    fn claim(
        &self,
        limit: usize,
        exclude: Vec<i64>,
    ) -> BoxFuture<'static, Result<Vec<Event>, DbError>>;
    /// Starts a batch for Kafka.
    fn batch(&self) -> Self::Batch;
    /// The source found nothing to claim: announces that it waits for rows. True: it
    /// waits, and from now on every insert notifies; false: an insert that did not
    /// notify is still in flight, so claim again first.
    fn wait_for_rows(&self) -> BoxFuture<'static, Result<bool, DbError>>;
    /// The source works again: inserts stop notifying.
    fn stop_waiting(&self);
    /// Settles landed batches: deletes, retries, dead-letters; hands them back.
    fn settle(&self, landed: Vec<Landed>) -> BoxFuture<'static, SettleOutcome>;
}

/// One batch being handed to Kafka (the sink's [`crate::sink::Outgoing`]).
pub trait Handover: Send {
    /// Hands event `i` of the batch over, or says why it cannot go.
    fn send(&mut self, i: usize, e: &Event) -> Result<(), Failure>;
    /// Every event handed over, acknowledged or failed.
    fn acks(self) -> Acks;
}

impl Handover for crate::sink::Outgoing {
    fn send(&mut self, i: usize, e: &Event) -> Result<(), Failure> {
        crate::sink::Outgoing::send(self, i, e)
    }
    fn acks(self) -> Acks {
        crate::sink::Outgoing::acks(self)
    }
}

/// Why leading a source ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The relay is shutting down.
    Cancelled,
    /// The lock's connection closed, with why.
    LostLock(String),
    /// Asked to hand the source over (a replica joined): what was out has settled.
    HandedOver,
    /// A claim found no free pooled connection: the source is given up, so that it does
    /// not sit on its lock doing nothing (another replica may have room).
    NoConnection,
}

/// A batch whose every record was acknowledged or failed, for the settle.
pub struct Landed {
    /// Its place in send order.
    pub seq: u64,
    /// Its events.
    pub batch: Vec<Event>,
    /// What becomes of them.
    pub settlement: Settlement,
}

/// Landed batches and whether settling them succeeded.
pub type SettleOutcome = (Vec<Landed>, Result<(), DbError>);

/// The pipeline's settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `batch_size`: rows per claim while traffic is light.
    pub batch_size: usize,
    /// `max_batch_size`: rows per claim at most, while a backlog drains.
    pub max_batch_size: usize,
    /// `in_flight_batches`: batches with the producer at once.
    pub in_flight: usize,
    /// `delete_batch_size`: delivered rows worth a settle without waiting.
    pub delete_batch_size: usize,
    /// `wakeup = "notify"`: announce waiting, so that inserts notify; `"poll"`: never
    /// (idle sources wake by the database's look every `process_interval`).
    pub announce: bool,
    /// `[retry]`: what a failure does to its event, and the outage backoff's base.
    pub retry: RetrySettings,
}
