//! The pipeline's slots: the running claim, the running settle, and the gate that
//! says whether new batches may go out.

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::{Ended, SettleOutcome};
use crate::db::DbError;
use crate::event::Event;

/// The claim slot: idle, or one claim running.
pub(super) enum ClaimSlot {
    Idle,
    Running {
        task: BoxFuture<'static, Result<Vec<Event>, DbError>>,
        /// The rows it asked for.
        limit: usize,
        /// Settles done when it started.
        gen: u64,
        started: Instant,
        /// Its result must be dropped: rows it left out as in flight or waiting were
        /// dropped meanwhile, so it may hold their aggregates' later events.
        stale: bool,
    },
}

/// A finished claim.
pub(super) struct Claimed {
    pub(super) result: Result<Vec<Event>, DbError>,
    pub(super) limit: usize,
    pub(super) gen: u64,
    pub(super) started: Instant,
    pub(super) stale: bool,
}

impl ClaimSlot {
    pub(super) fn is_running(&self) -> bool {
        matches!(self, ClaimSlot::Running { .. })
    }

    pub(super) fn gen(&self) -> Option<u64> {
        match self {
            ClaimSlot::Running { gen, .. } => Some(*gen),
            ClaimSlot::Idle => None,
        }
    }

    pub(super) fn mark_stale(&mut self) {
        if let ClaimSlot::Running { stale, .. } = self {
            *stale = true;
        }
    }

    /// Waits for the running claim (never resolves when idle); cancel-safe.
    pub(super) async fn wait(&mut self) -> Claimed {
        let ClaimSlot::Running { task, .. } = self else {
            return std::future::pending().await;
        };
        let result = task.await;
        match std::mem::replace(self, ClaimSlot::Idle) {
            ClaimSlot::Running {
                limit,
                gen,
                started,
                stale,
                ..
            } => Claimed {
                result,
                limit,
                gen,
                started,
                stale,
            },
            ClaimSlot::Idle => unreachable!("the slot was running"),
        }
    }
}

/// The settle slot: idle, or one settle running.
#[derive(Default)]
pub(super) struct SettleSlot(pub(super) Option<BoxFuture<'static, SettleOutcome>>);

impl SettleSlot {
    pub(super) fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// Waits for the running settle (never resolves when idle); cancel-safe.
    pub(super) async fn wait(&mut self) -> SettleOutcome {
        let Some(task) = self.0.as_mut() else {
            return std::future::pending().await;
        };
        let out = task.await;
        self.0 = None;
        out
    }
}

/// Whether new batches may go out, and whether the source is ending.
#[derive(Default)]
pub(super) struct Gate {
    /// Paused after a failure, until then.
    pub(super) paused_until: Option<Instant>,
    /// After a Kafka failure nothing new goes out until every flight has landed: the
    /// retried rows then never queue behind later rows still out (on a producer that
    /// may since have been replaced).
    pub(super) quiesce: bool,
    /// Ending: nothing new goes out; what is out lands and is settled first.
    pub(super) ending: Option<Ended>,
}

impl Gate {
    pub(super) fn open(&self) -> bool {
        self.paused_until.is_none() && !self.quiesce
    }

    /// Pauses until the later of an existing pause's end and `pause` from now.
    pub(super) fn pause(&mut self, pause: Duration) {
        let end = Instant::now() + pause;
        self.paused_until = Some(self.paused_until.map_or(end, |u| u.max(end)));
    }
}
