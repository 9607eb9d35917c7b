//! Logging an outage the way an on-call engineer wants to read it: once when it starts,
//! a reminder at most once a minute, and once when it ends; the tries in between at
//! debug level. Also says how long to pause before the next try.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::db::{DbError, DbErrorKind};
use crate::retry::backoff_jittered;

/// How often an ongoing outage is logged again.
pub const OUTAGE_REMINDER: Duration = Duration::from_secs(60);
/// Longest pause of a source between tries while Kafka or PostgreSQL is down.
pub const OUTAGE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What is wrong, as a log line says it: "{subject} {problem}".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Problem {
    /// What is failing: "kafka", "postgres", "outbox tables".
    pub subject: &'static str,
    /// How: "unreachable", "not as expected".
    pub problem: &'static str,
    /// Whether it may go away by itself (otherwise a person must fix it).
    pub transient: bool,
    /// What it stops: "holding events".
    pub effect: &'static str,
}

impl Problem {
    /// Kafka's brokers cannot be reached or refuse the relay.
    pub const KAFKA: Problem = Problem {
        subject: "kafka",
        problem: "unreachable",
        transient: true,
        effect: "holding events",
    };

    /// What a PostgreSQL error says is wrong.
    pub fn of(e: &DbError) -> Problem {
        let (subject, problem, transient) = match e.kind() {
            DbErrorKind::Unreachable | DbErrorKind::TimedOut => ("postgres", "unreachable", true),
            DbErrorKind::NoConnection => ("connection pool", "exhausted", true),
            DbErrorKind::Schema => ("outbox tables", "not as expected", false),
            DbErrorKind::Permission => ("postgres", "refuses the relay's role", false),
            DbErrorKind::Row => ("outbox row", "unreadable", false),
            DbErrorKind::NotASession => ("coordination connection", "not a session", false),
            DbErrorKind::Other => ("postgres", "failing", true),
        };
        Problem {
            subject,
            problem,
            transient,
            effect: "holding events",
        }
    }

    /// The same problem met by the database's look for pending rows, which wakes idle
    /// sources: the sources that lead learn of it from their own claims.
    pub fn looking(self) -> Problem {
        Problem {
            effect: "idle sources wake only on notifications",
            ..self
        }
    }

    /// The same problem met while listing the schemas of `schema_pattern` sources.
    pub fn discovering(self) -> Problem {
        Problem {
            effect: "pattern sources not added or removed",
            ..self
        }
    }

    /// The same problem met by the stats refresh, which holds no events back.
    pub fn stats(self) -> Problem {
        Problem {
            effect: "pending and dead-letter figures not refreshed",
            ..self
        }
    }
}

/// One kind of outage of one source (Kafka, or PostgreSQL), or of one database's
/// coordination connection.
pub struct Outage {
    since: Option<Instant>,
    last_log: Instant,
    attempts: u32,
    last: Option<Problem>,
    /// Whose outage it is: logged as `database` if true, else as `source`.
    of_database: bool,
}

/// A log line with the outage's owner as `source` or `database`.
macro_rules! said {
    ($level:ident, $outage:expr, $who:expr, $($rest:tt)*) => {
        if $outage.of_database {
            $level!(database = $who, $($rest)*)
        } else {
            $level!(source = $who, $($rest)*)
        }
    };
}

impl Default for Outage {
    fn default() -> Outage {
        Outage::new()
    }
}

impl Outage {
    /// No outage of a source.
    pub fn new() -> Outage {
        Outage {
            since: None,
            last_log: Instant::now(),
            attempts: 0,
            last: None,
            of_database: false,
        }
    }

    /// No outage of a database (its coordination connection, its discovery).
    pub fn database() -> Outage {
        Outage {
            of_database: true,
            ..Outage::new()
        }
    }

    /// Notes a failure; returns how long to pause (a jittered backoff from `base`, at
    /// most [`OUTAGE_BACKOFF_MAX`]).
    pub fn failed(&mut self, source: &str, what: Problem, error: &str, base: Duration) -> Duration {
        self.attempts += 1;
        let changed = self.last != Some(what);
        self.last = Some(what);
        let (subject, problem) = (what.subject, what.problem);
        match self.since {
            None => {
                self.since = Some(Instant::now());
                self.last_log = Instant::now();
                let until = if what.transient {
                    "it is back"
                } else {
                    "it is fixed"
                };
                let effect = what.effect;
                said!(
                    warn,
                    self,
                    source,
                    error,
                    "{subject} {problem}: {effect} until {until}"
                );
            }
            Some(since) if changed || self.last_log.elapsed() >= OUTAGE_REMINDER => {
                self.last_log = Instant::now();
                said!(
                    warn,
                    self,
                    source,
                    error,
                    down_for_s = since.elapsed().as_secs(),
                    attempts = self.attempts,
                    "{subject} still {problem}"
                );
            }
            Some(_) => said!(debug, self, source, error, "{subject} still {problem}"),
        }
        backoff_jittered(
            self.attempts,
            base.min(OUTAGE_BACKOFF_MAX),
            OUTAGE_BACKOFF_MAX,
        )
    }

    /// Notes a success: logs the end of an outage, if there was one.
    pub fn recovered(&mut self, source: &str) {
        if let (Some(since), Some(what)) = (self.since.take(), self.last) {
            let again = if what.problem == "unreachable" {
                "reachable again"
            } else {
                "working again"
            };
            said!(
                info,
                self,
                source,
                down_for_s = since.elapsed().as_secs_f64(),
                attempts = self.attempts,
                "{} {again}",
                what.subject
            );
        }
        self.attempts = 0;
    }

    /// Whether an outage is going on.
    pub fn active(&self) -> bool {
        self.since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_cap_and_start_over_after_recovery() {
        let mut o = Outage::new();
        let base = Duration::from_millis(100);
        assert!(!o.active());
        let first = o.failed("s", Problem::KAFKA, "down", base);
        assert!(first <= base, "{first:?}");
        assert!(o.active());
        for _ in 0..20 {
            assert!(o.failed("s", Problem::KAFKA, "down", base) <= OUTAGE_BACKOFF_MAX);
        }
        assert!(o.failed("s", Problem::KAFKA, "down", base) >= OUTAGE_BACKOFF_MAX / 2);
        o.recovered("s");
        assert!(!o.active());
        assert!(o.failed("s", Problem::KAFKA, "down", base) <= base);
    }

    #[test]
    fn a_schema_problem_is_not_called_unreachable() {
        let e = DbError::Schema {
            what: "claim".into(),
            detail: "relation \"s.outbox\" does not exist".into(),
        };
        let p = Problem::of(&e);
        assert_eq!((p.subject, p.problem), ("outbox tables", "not as expected"));
        assert!(!p.transient);
    }
}
