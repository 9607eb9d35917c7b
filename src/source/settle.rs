//! What becomes of each event of a landed batch, decided once, and the statements that
//! make it so: delivered rows are deleted, failed ones get their retry recorded or move
//! to the dead-letter table, in one settle per group of landed batches.

use std::collections::HashSet;
use std::time::Duration;

use deadpool_postgres::Pool;
use tracing::error;

use crate::config::{AfterDeadLetter, RetrySettings};
use crate::db::DbError;
use crate::event::Event;
use crate::metrics::Metrics;
use crate::retry::backoff_jittered;
use crate::sink::{Blame, Failure};

use super::holds::{aggregate, Aggregate};
use super::store::Store;
use crate::health::SourceHealth;

/// What a failure does to its event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not the event's fault: it stays as it is, its aggregate held, and the source pauses.
    Hold,
    /// Try again after `delay`; the aggregate's later events wait.
    Retry {
        /// The error kept in the row.
        error: String,
        /// Until the next attempt.
        delay: Duration,
    },
    /// Into the dead-letter table.
    DeadLetter {
        /// The error kept in the dead-letter row.
        error: String,
        /// Whether the aggregate's later events wait for it.
        hold: bool,
    },
}

/// The one retry-or-dead-letter decision: the failure's blame, the event's attempts so
/// far, and the retry settings decide.
pub fn verdict(e: &Event, f: &Failure, retry: &RetrySettings) -> Verdict {
    match f.blame() {
        Blame::Transport => Verdict::Hold,
        Blame::Permanent => Verdict::DeadLetter {
            error: format!("{}: {}", f.reason.label(), f.message),
            hold: retry.after_dead_letter == AfterDeadLetter::Block,
        },
        Blame::Retry => {
            let attempts = e.retry_count.saturating_add(1);
            if attempts > e.max_retries {
                Verdict::DeadLetter {
                    error: format!(
                        "{}: {} (gave up after {attempts} attempts)",
                        f.reason.label(),
                        f.message
                    ),
                    hold: true,
                }
            } else {
                Verdict::Retry {
                    error: f.message.clone(),
                    delay: backoff_jittered(attempts as u32, retry.backoff_base, retry.backoff_max),
                }
            }
        }
    }
}

/// What one batch leaves to settle.
#[derive(Debug, Default)]
pub struct Settlement {
    /// Ids Kafka acknowledged, sorted once the batch has landed.
    pub delivered: Vec<i64>,
    /// Ids to try again: (id, error, delay).
    pub retries: Vec<(i64, String, Duration)>,
    /// Ids for the dead-letter table: (id, error).
    pub dead: Vec<(i64, String)>,
    /// The transport failure that stopped the batch, if any.
    pub transport: Option<Failure>,
    /// Aggregates whose later events must wait (an event of theirs did not go out).
    pub held: HashSet<Aggregate>,
}

impl Settlement {
    /// Whether every event of the batch was delivered: its settle is a delete only,
    /// which nothing waits for.
    pub fn all_delivered(&self) -> bool {
        self.retries.is_empty()
            && self.dead.is_empty()
            && self.transport.is_none()
            && self.held.is_empty()
    }

    /// Whether `e` waits for an earlier event of its aggregate in this batch.
    pub fn holds_back(&self, e: &Event) -> bool {
        !self.held.is_empty() && self.held.contains(&aggregate(e))
    }

    /// Files `e`'s failure as its verdict says.
    pub fn record(&mut self, e: &Event, f: Failure, retry: &RetrySettings) {
        match verdict(e, &f, retry) {
            Verdict::Hold => {
                self.held.insert(aggregate(e));
                self.transport = Some(f);
            }
            Verdict::Retry { error, delay } => {
                self.held.insert(aggregate(e));
                self.retries.push((e.id, error, delay));
            }
            Verdict::DeadLetter { error, hold } => {
                if hold {
                    self.held.insert(aggregate(e));
                }
                self.dead.push((e.id, error));
            }
        }
    }

    /// The transport stopped the batch at `rest[0]`: those events stay in the outbox,
    /// their aggregates held.
    pub fn stopped(&mut self, rest: &[Event], f: Failure) {
        self.held.extend(rest.iter().map(aggregate));
        self.transport = Some(f);
    }
}

/// What a settle needs of its source.
pub struct Settler<'a> {
    /// The source's name.
    pub name: &'a str,
    /// Its pool.
    pub pool: &'a Pool,
    /// Its SQL.
    pub store: &'a Store,
    /// `delete_batch_size`.
    pub delete_chunk: usize,
    /// `dead_letter_size`.
    pub dead_letter_size: i64,
    /// How long a row waits when the dead-letter table is full (`retry.backoff_max`).
    pub park_for: Duration,
    /// `operation_timeout`.
    pub timeout: Duration,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// Health.
    pub health: &'a SourceHealth,
}

impl Settler<'_> {
    /// Deletes what was delivered, records retries, and moves what failed for good, for
    /// every batch in `settled` (with its events).
    pub async fn settle<'b>(
        &self,
        settled: impl Iterator<Item = (&'b [Event], &'b Settlement)> + Clone,
    ) -> Result<(), DbError> {
        tokio::time::timeout(self.timeout, self.run(settled))
            .await
            .map_err(|_| DbError::timed_out("settle batch", self.timeout))?
    }

    async fn run<'b>(
        &self,
        settled: impl Iterator<Item = (&'b [Event], &'b Settlement)> + Clone,
    ) -> Result<(), DbError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| DbError::pool("settle: pool", &e, self.timeout))?;
        let delivered: Vec<i64> = settled
            .clone()
            .flat_map(|(_, s)| s.delivered.iter().copied())
            .collect();
        if !delivered.is_empty() {
            self.store
                .delete(&client, &delivered, self.delete_chunk)
                .await?;
        }
        let (mut ids, mut errors, mut delays) = (Vec::new(), Vec::new(), Vec::new());
        for (id, error, delay) in settled.clone().flat_map(|(_, s)| &s.retries) {
            ids.push(*id);
            errors.push(error.clone());
            delays.push(*delay);
        }
        if !ids.is_empty() {
            self.store
                .record_retries(&client, &ids, &errors, &delays)
                .await?;
        }
        let mut dead: Vec<(i64, String)> = settled
            .clone()
            .flat_map(|(_, s)| s.dead.iter().cloned())
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        dead.sort_unstable_by_key(|(id, _)| *id);
        let (ids, errors): (Vec<i64>, Vec<String>) = dead.into_iter().unzip();
        let (moved, parked) = self
            .store
            .dead_letter(
                &mut client,
                &ids,
                &errors,
                self.dead_letter_size,
                self.park_for,
            )
            .await?;
        self.metrics
            .dead_lettered
            .with_label_values(&[self.name])
            .inc_by(moved);
        for e in settled
            .flat_map(|(batch, _)| batch)
            .filter(|e| ids.binary_search(&e.id).is_ok())
        {
            error!(
                source = self.name,
                event_id = %e.event_id,
                aggregate_id = %e.aggregate_id,
                correlation_id = e.correlation_id.as_deref().unwrap_or(""),
                trace_id = e.trace_id().unwrap_or(""),
                "event dead-lettered"
            );
        }
        if parked > 0 {
            error!(
                source = self.name,
                parked,
                capacity = self.dead_letter_size,
                "dead-letter table full: failing events stay in the outbox"
            );
            self.health.set_error(format!(
                "dead-letter table full ({} rows): {parked} failing events stay in the outbox",
                self.dead_letter_size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Reason;

    fn settings(after: AfterDeadLetter) -> RetrySettings {
        RetrySettings {
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(8),
            after_dead_letter: after,
        }
    }

    fn event(retry_count: i32, max_retries: i32) -> Event {
        Event {
            retry_count,
            max_retries,
            ..Event::sample(1, "a")
        }
    }

    fn failure(reason: Reason) -> Failure {
        Failure {
            reason,
            message: "boom".into(),
        }
    }

    #[test]
    fn a_retryable_failure_retries_until_its_attempts_are_spent() {
        let s = settings(AfterDeadLetter::Continue);
        let f = failure(Reason::UnknownTopic);
        match verdict(&event(0, 3), &f, &s) {
            Verdict::Retry { error, delay } => {
                assert_eq!(error, "boom");
                assert!(delay >= Duration::from_millis(500) && delay <= Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        match verdict(&event(3, 3), &f, &s) {
            Verdict::DeadLetter { error, hold } => {
                assert_eq!(error, "unknown_topic: boom (gave up after 4 attempts)");
                assert!(
                    hold,
                    "its later events wait for the settle, whatever after_dead_letter says"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_permanent_failure_is_dead_lettered_at_once_and_holds_only_when_blocking() {
        let f = failure(Reason::MessageTooLarge);
        let continue_ = verdict(&event(0, 3), &f, &settings(AfterDeadLetter::Continue));
        assert_eq!(
            continue_,
            Verdict::DeadLetter {
                error: "message_too_large: boom".into(),
                hold: false
            }
        );
        let block = verdict(&event(0, 3), &f, &settings(AfterDeadLetter::Block));
        assert!(matches!(block, Verdict::DeadLetter { hold: true, .. }));
        assert_eq!(
            verdict(
                &event(9, 0),
                &failure(Reason::Transport),
                &settings(AfterDeadLetter::Block)
            ),
            Verdict::Hold,
            "the transport's failures never count against the event"
        );
    }
}
