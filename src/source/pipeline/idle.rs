//! What a source does when a claim finds nothing: it announces that it waits for rows
//! (its waiting lock, migration 005), claims once more, and sleeps until a wake-up.
//! Inserts notify only while it waits, so a busy relay costs the services' commits no
//! NOTIFY; the lock closes the race between "nothing found" and "asleep".

use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::db::DbError;

/// How soon a source claims again after a short claim that found rows: more are
/// likely coming, and no notification will say so while it does not wait.
pub const REPOLL: Duration = Duration::from_millis(3);
/// A row found this long after the last rows is an event on its own: the source keeps
/// waiting for the next one's notification instead of looking again by itself. Closer
/// rows are steady traffic (at 1,000 events/s, a claim per notification cost 61 µs of
/// CPU per event against 49 µs with a look every 3 ms, which takes several rows each).
pub const QUIET: Duration = Duration::from_millis(20);
/// The longest wait between claims while announcing keeps failing (an insert that did
/// not notify stays in flight: a long transaction).
pub const REPOLL_MAX: Duration = Duration::from_millis(32);

/// Where a source stands when it has nothing to do.
#[derive(Default)]
pub enum Idle {
    /// Working, or about to claim; inserts do not notify.
    #[default]
    Busy,
    /// Asking for its waiting lock.
    Announcing(BoxFuture<'static, Result<bool, DbError>>),
    /// Holding it: the claim running or next is the last look before sleeping.
    Rechecking,
    /// Holding it, and the last look found nothing: asleep until a wake-up.
    Waiting,
}

impl Idle {
    /// Whether the waiting lock is held (inserts notify).
    pub fn holds_lock(&self) -> bool {
        matches!(self, Idle::Rechecking | Idle::Waiting)
    }

    pub fn is_announcing(&self) -> bool {
        matches!(self, Idle::Announcing(_))
    }

    /// Waits for the announcement's answer (never resolves otherwise); cancel-safe.
    pub async fn announced(&mut self) -> Result<bool, DbError> {
        let Idle::Announcing(f) = self else {
            return std::future::pending().await;
        };
        let r = f.await;
        *self = Idle::Busy;
        r
    }
}

/// When to claim again after `fails` announcements in a row found an insert in flight.
pub fn repoll_after(fails: u32) -> Instant {
    Instant::now() + (REPOLL * 2u32.saturating_pow(fails.min(8))).min(REPOLL_MAX)
}
