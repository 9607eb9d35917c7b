//! Waiting for a condition with a deadline, never sleeping and hoping.
//!
//! [`eventually`] polls a condition every 25 ms until it holds and returns what it yielded;
//! after the deadline it panics naming what it waited for and what it saw last. A
//! condition is an async closure (`async || rows() == 0` for a plain, synchronous check)
//! whose result is an [`Outcome`]: a `bool`, an `Option` (`Some(v)` holds and yields `v`),
//! or a `Result` (`Ok(v)` holds; `Err(seen)` says what was seen instead, for the panic
//! message). [`eventually_blocking`] is the same loop for code without a runtime (the
//! `#[test]`s that drive the relay binary, the harness's own blocking helpers).

use std::fmt::Display;
use std::time::{Duration, Instant};

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(25);

/// What one poll of a condition found: either it holds, with a value, or what was seen.
pub trait Outcome {
    /// What the wait returns once the condition holds.
    type Value;
    /// `Ok(value)` when the condition holds, else `Err(what was seen instead)`.
    fn settle(self) -> Result<Self::Value, String>;
}

impl Outcome for bool {
    type Value = ();
    fn settle(self) -> Result<(), String> {
        if self {
            Ok(())
        } else {
            Err("the condition was still false".into())
        }
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn settle(self) -> Result<T, String> {
        self.ok_or_else(|| "the condition was still None".into())
    }
}

impl<T, E: Display> Outcome for Result<T, E> {
    type Value = T;
    fn settle(self) -> Result<T, String> {
        self.map_err(|e| e.to_string())
    }
}

/// Polls `condition` every 25 ms until it holds and returns its value; panics after
/// `deadline` with `what` and the last thing the condition saw.
pub async fn eventually<O: Outcome>(
    what: &str,
    deadline: Duration,
    condition: impl AsyncFnMut() -> O,
) -> O::Value {
    poll(what, deadline, condition, Pause::Tokio).await
}

/// [`eventually`] for code without an async runtime: the same loop, sleeping the thread.
pub fn eventually_blocking<O: Outcome>(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> O,
) -> O::Value {
    futures::executor::block_on(poll(what, deadline, async || condition(), Pause::Thread))
}

#[derive(Clone, Copy)]
enum Pause {
    Tokio,
    Thread,
}

async fn poll<O: Outcome>(
    what: &str,
    deadline: Duration,
    mut condition: impl AsyncFnMut() -> O,
    pause: Pause,
) -> O::Value {
    let end = Instant::now() + deadline;
    loop {
        let seen = match condition().await.settle() {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        if Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for: {what}\nlast seen: {seen}");
        }
        match pause {
            Pause::Tokio => tokio::time::sleep(POLL).await,
            Pause::Thread => std::thread::sleep(POLL),
        }
    }
}
