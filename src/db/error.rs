//! PostgreSQL errors as the relay acts on them: the server is unreachable or slow (a
//! transient outage: hold the events and try again), or the relay's statements cannot
//! work as things stand (the outbox tables are not as the relay expects, its role may
//! not do what it needs, a row will not decode), which a person has to fix.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use super::chain;

/// A PostgreSQL failure, typed where the store and the connections meet the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// The server cannot be reached, dropped the connection, or refuses connections for
    /// now (starting, shutting down, out of connection slots).
    #[error("{what}: postgres unreachable: {detail}")]
    Unreachable {
        /// What the relay was doing.
        what: String,
        /// The error and its causes.
        detail: String,
    },
    /// Every connection of the pool stayed busy: the relay has too few for its sources
    /// (`pool_size`), or statements are slow.
    #[error(
        "{what}: no pooled connection free within {after:?} (pool_size too small for the load?)"
    )]
    NoConnection {
        /// What the relay was doing.
        what: String,
        /// How long it waited (`operation_timeout`).
        after: Duration,
    },
    /// No answer in time.
    #[error("{what}: timed out after {after:?}")]
    TimedOut {
        /// What the relay was doing.
        what: String,
        /// The limit (`operation_timeout`).
        after: Duration,
    },
    /// The outbox tables are not as the relay expects: missing, or missing a column
    /// (`outbox-relay migrate` has not run on this schema, or the table predates it).
    #[error("{what}: the outbox tables are not as the relay expects (has `outbox-relay migrate` run?): {detail}")]
    Schema {
        /// What the relay was doing.
        what: String,
        /// The error and its causes.
        detail: String,
    },
    /// The relay's role may not log in or may not do what the statement needs.
    #[error("{what}: permission denied for the relay's role: {detail}")]
    Permission {
        /// What the relay was doing.
        what: String,
        /// The error and its causes.
        detail: String,
    },
    /// A row the relay read cannot be decoded (a NULL or a type it does not expect).
    #[error("{what}: a row cannot be read: {detail}")]
    Row {
        /// What the relay was doing.
        what: String,
        /// The error and its causes.
        detail: String,
    },
    /// The coordination connection does not keep a session of its own: a pooler in
    /// transaction or statement mode hands its statements to whichever server process is
    /// free, so the session advisory locks and LISTEN the relay needs do not hold.
    #[error("{what}: the coordination connection does not keep its session ({detail}); session advisory locks and LISTEN need one: point coordination_url at PostgreSQL itself or at a pooler in session mode")]
    NotASession {
        /// What the relay was doing.
        what: String,
        /// What showed it.
        detail: String,
    },
    /// Anything else the server or the driver reported.
    #[error("{what}: {detail}")]
    Other {
        /// What the relay was doing.
        what: String,
        /// The error and its causes.
        detail: String,
    },
}

/// The kinds of [`DbError`], for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    /// [`DbError::Unreachable`].
    Unreachable,
    /// [`DbError::NoConnection`].
    NoConnection,
    /// [`DbError::TimedOut`].
    TimedOut,
    /// [`DbError::Schema`].
    Schema,
    /// [`DbError::Permission`].
    Permission,
    /// [`DbError::Row`].
    Row,
    /// [`DbError::NotASession`].
    NotASession,
    /// [`DbError::Other`].
    Other,
}

impl DbError {
    /// Classifies a driver error met while doing `what`.
    pub fn pg(what: impl Into<String>, e: &tokio_postgres::Error) -> DbError {
        let what = what.into();
        let detail = chain(e);
        match kind_of(e) {
            DbErrorKind::Unreachable => DbError::Unreachable { what, detail },
            DbErrorKind::Schema => DbError::Schema { what, detail },
            DbErrorKind::Permission => DbError::Permission { what, detail },
            DbErrorKind::Row => DbError::Row { what, detail },
            DbErrorKind::NoConnection
            | DbErrorKind::TimedOut
            | DbErrorKind::NotASession
            | DbErrorKind::Other => DbError::Other { what, detail },
        }
    }

    /// Classifies a failure to get a pooled connection.
    pub fn pool(
        what: impl Into<String>,
        e: &deadpool_postgres::PoolError,
        after: Duration,
    ) -> DbError {
        use deadpool_postgres::PoolError as P;
        let what = what.into();
        match e {
            P::Backend(pg) => DbError::pg(what, pg),
            P::Timeout(deadpool_postgres::TimeoutType::Wait) => {
                DbError::NoConnection { what, after }
            }
            P::Timeout(_) => DbError::TimedOut { what, after },
            other => DbError::Unreachable {
                what,
                detail: chain(other),
            },
        }
    }

    /// `what` got no answer within `after`.
    pub fn timed_out(what: impl Into<String>, after: Duration) -> DbError {
        DbError::TimedOut {
            what: what.into(),
            after,
        }
    }

    /// The coordination connection shows that it is not a session of its own.
    pub fn not_a_session(what: impl Into<String>, detail: impl Into<String>) -> DbError {
        DbError::NotASession {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// An error of the relay's own making before it reached the server (say, TLS setup).
    pub fn other(what: impl Into<String>, detail: impl Into<String>) -> DbError {
        DbError::Other {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> DbErrorKind {
        match self {
            DbError::Unreachable { .. } => DbErrorKind::Unreachable,
            DbError::NoConnection { .. } => DbErrorKind::NoConnection,
            DbError::TimedOut { .. } => DbErrorKind::TimedOut,
            DbError::Schema { .. } => DbErrorKind::Schema,
            DbError::Permission { .. } => DbErrorKind::Permission,
            DbError::Row { .. } => DbErrorKind::Row,
            DbError::NotASession { .. } => DbErrorKind::NotASession,
            DbError::Other { .. } => DbErrorKind::Other,
        }
    }
}

fn kind_of(e: &tokio_postgres::Error) -> DbErrorKind {
    if let Some(db) = e.as_db_error() {
        return kind_of_state(db.code());
    }
    if e.is_closed() {
        return DbErrorKind::Unreachable;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return DbErrorKind::Unreachable;
        }
        if c.is::<tokio_postgres::types::WasNull>() {
            return DbErrorKind::Row;
        }
        cause = c.source();
    }
    // The driver's own kinds, which it shows but does not expose.
    let text = e.to_string();
    if text.starts_with("error deserializing column") || text.starts_with("invalid column") {
        DbErrorKind::Row
    } else if text.starts_with("authentication error") {
        DbErrorKind::Permission
    } else if text.starts_with("error connecting")
        || text.starts_with("error communicating")
        || text.starts_with("error performing TLS handshake")
        || text.starts_with("timeout waiting for server")
    {
        DbErrorKind::Unreachable
    } else {
        DbErrorKind::Other
    }
}

fn kind_of_state(code: &SqlState) -> DbErrorKind {
    let c = code.code();
    if c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") {
        // connection exceptions, insufficient resources (too many connections), and the
        // server shutting down, starting or crashed.
        DbErrorKind::Unreachable
    } else if c.starts_with("28") || *code == SqlState::INSUFFICIENT_PRIVILEGE {
        DbErrorKind::Permission
    } else if [
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_COLUMN,
        SqlState::UNDEFINED_FUNCTION,
        SqlState::INVALID_SCHEMA_NAME,
        SqlState::UNDEFINED_OBJECT,
        SqlState::DATATYPE_MISMATCH,
        SqlState::WRONG_OBJECT_TYPE,
    ]
    .contains(code)
    {
        DbErrorKind::Schema
    } else {
        DbErrorKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_states_are_classified_by_what_fixes_them() {
        for (code, kind) in [
            (SqlState::ADMIN_SHUTDOWN, DbErrorKind::Unreachable),
            (SqlState::CANNOT_CONNECT_NOW, DbErrorKind::Unreachable),
            (SqlState::TOO_MANY_CONNECTIONS, DbErrorKind::Unreachable),
            (SqlState::CONNECTION_FAILURE, DbErrorKind::Unreachable),
            (SqlState::QUERY_CANCELED, DbErrorKind::Other),
            (SqlState::INSUFFICIENT_PRIVILEGE, DbErrorKind::Permission),
            (SqlState::INVALID_PASSWORD, DbErrorKind::Permission),
            (SqlState::UNDEFINED_TABLE, DbErrorKind::Schema),
            (SqlState::UNDEFINED_COLUMN, DbErrorKind::Schema),
            (SqlState::T_R_SERIALIZATION_FAILURE, DbErrorKind::Other),
        ] {
            assert_eq!(kind_of_state(&code), kind, "{code:?}");
        }
    }

    #[test]
    fn a_pool_that_had_no_free_connection_is_told_from_a_slow_server() {
        use deadpool_postgres::{PoolError, TimeoutType};
        let after = Duration::from_secs(3);
        let e = DbError::pool("claim: pool", &PoolError::Timeout(TimeoutType::Wait), after);
        assert_eq!(e.kind(), DbErrorKind::NoConnection);
        assert!(e.to_string().contains("pool_size"), "{e}");
        let e = DbError::pool(
            "claim: pool",
            &PoolError::Timeout(TimeoutType::Create),
            after,
        );
        assert_eq!(e.kind(), DbErrorKind::TimedOut);
    }

    #[test]
    fn messages_say_what_the_relay_was_doing_and_what_is_wrong() {
        let e = DbError::Schema {
            what: "claim".into(),
            detail: "column \"max_retries\" does not exist".into(),
        };
        let text = e.to_string();
        assert!(text.starts_with("claim: the outbox tables"), "{text}");
        assert!(text.contains("max_retries"), "{text}");
        assert_eq!(e.kind(), DbErrorKind::Schema);
        let t = DbError::timed_out("claim", Duration::from_secs(1));
        assert_eq!(t.kind(), DbErrorKind::TimedOut);
        assert_eq!(t.to_string(), "claim: timed out after 1s");
    }
}
