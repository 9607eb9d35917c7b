//! What the HTTP server and the supervisor can see of each source: a small set of
//! counters and flags its task updates, read without locks.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// One source's visible state, updated by its task.
#[derive(Debug, Default)]
pub struct SourceHealth {
    /// Unix milliseconds of the task's last sign of life (progress or an idle wake-up).
    pub heartbeat_ms: AtomicU64,
    /// Whether this replica holds the source.
    pub leader: AtomicBool,
    /// Whether the task waits for nothing but a wake-up or a lead (idle, not stuck).
    pub parked: AtomicBool,
    /// Events published by this process.
    pub processed: AtomicU64,
    /// Failed publish attempts seen by this process.
    pub failed: AtomicU64,
    /// Rows pending at the last refresh.
    pub pending: AtomicI64,
    /// Rows in the dead-letter table at the last refresh.
    pub dead_letter_rows: AtomicI64,
    /// The last error, for `/health/deep`.
    pub last_error: Mutex<Option<String>>,
}

/// A copy of [`SourceHealth`] at one moment, for `/health/deep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Whether this replica holds the source.
    pub leader: bool,
    /// Events published by this process.
    pub processed: u64,
    /// Failed publish attempts seen by this process.
    pub failed: u64,
    /// Rows pending at the last refresh.
    pub pending: i64,
    /// Rows in the dead-letter table at the last refresh.
    pub dead_letter_rows: i64,
    /// The last error.
    pub last_error: Option<String>,
}

impl SourceHealth {
    /// A source that gave a sign of life just now.
    pub fn new() -> SourceHealth {
        let h = SourceHealth::default();
        h.beat();
        h
    }

    /// Records a sign of life now.
    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Records a sign of life, and whether the task now waits for nothing but a
    /// wake-up (a parked task cannot be stuck: it has nothing to do).
    pub fn park(&self, on: bool) {
        self.beat();
        self.parked.store(on, Ordering::Relaxed);
    }

    /// Whether the task is parked.
    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::Relaxed)
    }

    /// Time since the last sign of life.
    pub fn silent_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.heartbeat_ms.load(Ordering::Relaxed)))
    }

    /// Whether this replica holds the source.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Keeps `e` as the last error.
    pub fn set_error(&self, e: impl Into<String>) {
        let mut g = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *g = Some(e.into());
    }

    /// The state now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            leader: self.is_leader(),
            processed: self.processed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            dead_letter_rows: self.dead_letter_rows.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
