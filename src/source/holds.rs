//! Per-aggregate order while batches overlap: an aggregate whose event failed holds
//! back its later events until the failure is recorded in the outbox, after which the
//! claim's SQL skips them (a row waiting for its retry holds back its aggregate's later
//! rows).

use std::collections::HashMap;

use crate::event::Event;

/// An aggregate: (aggregate_type, aggregate_id). Events of one aggregate go out in id order.
pub type Aggregate = (String, String);

/// The aggregate of `e`: the one place the key is built.
pub fn aggregate(e: &Event) -> Aggregate {
    (e.aggregate_type.clone(), e.aggregate_id.clone())
}

/// An aggregate with a failed event whose later events must not go out yet.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Hold {
    /// Failures of this aggregate not yet recorded in the outbox.
    unsettled: u32,
    /// The settle count when its last failure was recorded: claims that started later
    /// skip the aggregate in SQL.
    settled_at: u64,
}

/// The aggregates held back, each with its failures not yet settled.
#[derive(Debug, Default)]
pub struct Holds {
    held: HashMap<Aggregate, Hold>,
}

impl Holds {
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// A failure of `key` is waiting to be recorded.
    pub fn failed(&mut self, key: &Aggregate) {
        match self.held.get_mut(key) {
            Some(h) => h.unsettled += 1,
            None => {
                self.held.insert(
                    key.clone(),
                    Hold {
                        unsettled: 1,
                        settled_at: 0,
                    },
                );
            }
        }
    }

    /// A failure of `key` was recorded by settle number `settles_done`.
    pub fn settled(&mut self, key: &Aggregate, settles_done: u64) {
        if let Some(h) = self.held.get_mut(key) {
            h.unsettled = h.unsettled.saturating_sub(1);
            h.settled_at = settles_done;
        }
    }

    /// Whether every failure is recorded: only then may a claim start, since the claim
    /// could not skip the failed aggregates in SQL yet.
    pub fn all_settled(&self) -> bool {
        self.held.values().all(|h| h.unsettled == 0)
    }

    /// Whether `e`, claimed by a claim that started after settle number `gen`, must
    /// wait: its aggregate has a failure not yet recorded, or recorded after the claim
    /// started (so the claim's SQL did not skip it).
    pub fn holds_back(&self, e: &Event, gen: u64) -> bool {
        if self.held.is_empty() {
            return false;
        }
        self.held
            .get(&aggregate(e))
            .is_some_and(|h| h.unsettled > 0 || h.settled_at > gen)
    }

    /// The prune rule: a hold is needed only by claims that started before it was
    /// settled; `oldest` is the settle count when the oldest live claim started.
    pub fn prune(&mut self, oldest: u64) {
        self.held
            .retain(|_, h| h.unsettled > 0 || h.settled_at > oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, agg: &str) -> Event {
        Event::sample(id, agg)
    }

    #[test]
    fn a_hold_lasts_until_no_claim_that_predates_its_settle_is_left() {
        let mut h = Holds::default();
        let a = aggregate(&event(1, "A"));
        h.failed(&a);
        assert!(!h.all_settled());
        assert!(
            h.holds_back(&event(2, "A"), 5),
            "unsettled holds any claim back"
        );
        assert!(!h.holds_back(&event(2, "B"), 0), "other aggregates go");
        h.settled(&a, 3);
        assert!(h.all_settled());
        assert!(
            h.holds_back(&event(2, "A"), 2),
            "a claim from before the settle"
        );
        assert!(
            !h.holds_back(&event(2, "A"), 3),
            "a claim from after it skipped A in SQL"
        );
        h.prune(2);
        assert!(
            !h.is_empty(),
            "a claim from before the settle is still live"
        );
        h.prune(3);
        assert!(h.is_empty());
    }

    #[test]
    fn two_failures_of_one_aggregate_need_two_settles() {
        let mut h = Holds::default();
        let a = aggregate(&event(1, "A"));
        h.failed(&a);
        h.failed(&a);
        h.settled(&a, 1);
        assert!(!h.all_settled());
        h.prune(u64::MAX);
        assert!(!h.is_empty());
        h.settled(&a, 2);
        h.prune(u64::MAX);
        assert!(h.is_empty());
    }
}
