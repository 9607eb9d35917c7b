//! What was written and what arrived: the services count their committed and rolled-back
//! events, the consumer counts what it received, and the summary compares the two.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use uuid::Uuid;

use crate::{Service, SERVICES};

/// Counters of one service. Writers update the first two, the consumer the rest.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events in committed transactions.
    pub committed: AtomicU64,
    /// Events written in transactions that were rolled back.
    pub rolled_back: AtomicU64,
    /// Records consumed, duplicates included.
    pub received: AtomicU64,
    /// Committed events consumed at least once.
    pub distinct: AtomicU64,
    /// Records consumed again (at-least-once allows them).
    pub duplicates: AtomicU64,
    /// Events that arrived after a later version of their aggregate.
    pub out_of_order: AtomicU64,
    /// Rolled-back events that were published anyway (must stay 0).
    pub rolled_back_seen: AtomicU64,
    /// Records the demo cannot interpret (no event_id, key or version).
    pub malformed: AtomicU64,
}

/// The demo's books.
#[derive(Debug, Default)]
pub struct Ledger {
    services: [Counters; 4],
    /// event_ids of every event whose transaction was rolled back.
    rolled_back_ids: Mutex<HashSet<Uuid>>,
    /// A few examples of order violations, for the summary.
    pub out_of_order_examples: Mutex<Vec<String>>,
}

impl Ledger {
    /// The counters of `service`.
    pub fn service(&self, service: Service) -> &Counters {
        &self.services[service.index()]
    }

    /// Records a committed transaction's events.
    pub fn committed(&self, service: Service, events: usize) {
        self.service(service)
            .committed
            .fetch_add(events as u64, Ordering::Relaxed);
    }

    /// Records the events of a transaction about to be rolled back. Called before the
    /// ROLLBACK, so the consumer knows them before they could possibly appear.
    pub fn rolling_back(&self, service: Service, event_ids: &[Uuid]) {
        self.service(service)
            .rolled_back
            .fetch_add(event_ids.len() as u64, Ordering::Relaxed);
        if let Ok(mut ids) = self.rolled_back_ids.lock() {
            ids.extend(event_ids.iter().copied());
        }
    }

    /// Whether `event_id` belongs to a rolled-back transaction.
    pub fn was_rolled_back(&self, event_id: &Uuid) -> bool {
        self.rolled_back_ids
            .lock()
            .map(|ids| ids.contains(event_id))
            .unwrap_or(false)
    }

    /// Sum of one counter over every service.
    pub fn total(&self, counter: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        SERVICES
            .iter()
            .map(|s| counter(self.service(*s)).load(Ordering::Relaxed))
            .sum()
    }
}

/// How an event's arrival relates to what was seen of its aggregate before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First arrival, after every lower version seen so far.
    InOrder,
    /// First arrival, but a higher version of the aggregate arrived before it.
    OutOfOrder,
    /// This version arrived before.
    Duplicate,
}

/// The versions of one aggregate the consumer has seen. Versions count from 1 without
/// gaps in committed history (a rolled-back transaction rolls its version bump back too),
/// so "all versions up to n" plus the few seen beyond a gap describe it compactly.
#[derive(Debug, Default)]
pub struct AggregateLog {
    /// Every version in 1..=contiguous has arrived.
    contiguous: u64,
    /// Versions above `contiguous + 1` that have arrived.
    ahead: BTreeSet<u64>,
    /// The highest version that has arrived.
    highest: u64,
}

impl AggregateLog {
    /// Records the arrival of `version`.
    pub fn record(&mut self, version: u64) -> Arrival {
        if version <= self.contiguous || self.ahead.contains(&version) {
            return Arrival::Duplicate;
        }
        let late = version < self.highest;
        self.highest = self.highest.max(version);
        if version == self.contiguous + 1 {
            self.contiguous = version;
            while self.ahead.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        } else {
            self.ahead.insert(version);
        }
        if late {
            Arrival::OutOfOrder
        } else {
            Arrival::InOrder
        }
    }

    /// The highest version seen so far.
    pub fn highest(&self) -> u64 {
        self.highest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_arrivals_and_redelivered_batches() {
        let mut log = AggregateLog::default();
        for v in 1..=3 {
            assert_eq!(log.record(v), Arrival::InOrder);
        }
        // A batch published again after a crash between Kafka's ack and the delete.
        for v in 1..=3 {
            assert_eq!(log.record(v), Arrival::Duplicate);
        }
        assert_eq!(log.record(4), Arrival::InOrder);
        assert_eq!(log.highest(), 4);
    }

    #[test]
    fn a_version_overtaken_by_a_later_one_is_out_of_order() {
        let mut log = AggregateLog::default();
        assert_eq!(log.record(1), Arrival::InOrder);
        assert_eq!(log.record(3), Arrival::InOrder);
        assert_eq!(log.record(2), Arrival::OutOfOrder);
        assert_eq!(log.record(2), Arrival::Duplicate);
        assert_eq!(log.record(3), Arrival::Duplicate);
        assert_eq!(log.record(4), Arrival::InOrder);
        assert!(log.ahead.is_empty(), "the gap closed: {log:?}");
    }

    #[test]
    fn rolled_back_events_are_remembered() {
        let ledger = Ledger::default();
        let id = Uuid::from_u128(7);
        ledger.rolling_back(Service::Product, &[id]);
        assert!(ledger.was_rolled_back(&id));
        assert!(!ledger.was_rolled_back(&Uuid::from_u128(8)));
        assert_eq!(
            ledger
                .service(Service::Product)
                .rolled_back
                .load(Ordering::Relaxed),
            1
        );
    }
}
