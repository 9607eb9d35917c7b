//! One claimed row: the columns a claim reads, its payload's size, and turning the row
//! into an [`Event`] or a row the relay cannot send.

use tokio_postgres::Row;

use crate::db::DbError;
use crate::event::{Defect, Event};

/// The columns the relay reads, in [`Event`]'s order, named as [`NAMES`] says, then the
/// payload's size in bytes. Text columns are read as text whatever their declared type
/// (tables that predate the relay use varchar). A payload is sent with the row only
/// when it is at most `{inline}` bytes; a larger one is measured, not read (see
/// [`size_of`]), and [`super::Store::claim`] fetches it apart if it may go at all.
pub(super) fn columns(inline: &str) -> String {
    format!(
        "o.id::int8, o.event_id::text, o.aggregate_type::text, o.aggregate_id::text, o.event_type::text, \
         CASE WHEN z.n <= {inline}::int4 THEN o.payload::text END, o.topic::text, \
         o.headers::text, o.correlation_id::text, o.idempotency_token::text, \
         o.created_at, o.retry_count, COALESCE(o.max_retries, $2::int), z.n"
    )
}

/// The payload's size in bytes, for [`columns`]. An uncompressed payload whose stored
/// size alone proves it small (a byte of jsonb is at most six of text: `"\u0001"`)
/// stands for its size without being converted twice; any other (a compressed one may
/// be of any size) is measured by its text (`pg_column_compression`: PostgreSQL 14 and
/// later).
pub(super) fn size_of(inline: &str) -> String {
    format!(
        "CROSS JOIN LATERAL (SELECT (CASE WHEN o.payload IS NULL THEN 0 \
             WHEN pg_column_compression(o.payload) IS NULL \
                 AND pg_column_size(o.payload) * 6 <= {inline}::int4 \
                 THEN pg_column_size(o.payload) \
             ELSE octet_length(o.payload::text) END)::int4 AS n) z"
    )
}

/// The names of the columns [`columns`] reads, for errors about a row.
const NAMES: [&str; 13] = [
    "id",
    "event_id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "topic",
    "headers",
    "correlation_id",
    "idempotency_token",
    "created_at",
    "retry_count",
    "max_retries",
];

/// One claimed row as an [`Event`]. A column that will not decode (NULL where the
/// contract needs a value, a type the relay cannot read) makes the row a
/// [`Defect::Unreadable`] naming the column, to be dead-lettered; only the id must read.
pub(super) fn decode(r: &Row, max_payload: i64) -> Result<(Event, i64), DbError> {
    let mut defects: Vec<String> = Vec::new();
    fn read<'a, T: tokio_postgres::types::FromSql<'a>>(
        r: &'a Row,
        i: usize,
        defects: &mut Vec<String>,
    ) -> Option<T> {
        match r.try_get::<_, T>(i) {
            Ok(v) => Some(v),
            Err(e) => {
                let null = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<tokio_postgres::types::WasNull>());
                let why = if null {
                    "is NULL, which the contract forbids".to_string()
                } else {
                    format!("cannot be read: {}", crate::db::chain(&e))
                };
                defects.push(format!("column {} {why}", NAMES[i]));
                None
            }
        }
    }
    let id: i64 = r
        .try_get(0)
        .map_err(|e| DbError::pg("claim: column id", &e))?;
    let d = &mut defects;
    let event_id = read::<String>(r, 1, d).and_then(|text| {
        uuid::Uuid::parse_str(&text)
            .map_err(|_| d.push("column event_id is not a UUID".to_string()))
            .ok()
    });
    let event_id = event_id.unwrap_or_default();
    let aggregate_type = read(r, 2, d).unwrap_or_default();
    let aggregate_id = read(r, 3, d).unwrap_or_default();
    let event_type = read(r, 4, d).unwrap_or_default();
    let payload = read(r, 5, d).unwrap_or_default();
    let topic = read(r, 6, d).unwrap_or_default();
    let headers = read(r, 7, d).unwrap_or_default();
    let correlation_id = read(r, 8, d).unwrap_or_default();
    let idempotency_token = read(r, 9, d).unwrap_or_default();
    let created_at = read(r, 10, d).unwrap_or(std::time::SystemTime::UNIX_EPOCH);
    let retry_count = read(r, 11, d).unwrap_or_default();
    let max_retries = read(r, 12, d).unwrap_or_default();
    let size = i64::from(r.try_get::<_, i32>(13).unwrap_or(0));
    let defect = if !defects.is_empty() {
        Some(Defect::Unreadable(defects.join("; ")))
    } else if size > max_payload {
        Some(Defect::TooLarge(format!(
            "payload of {size} bytes is larger than the producer's message.max.bytes \
             ({max_payload}); not read. Shrink the payload or raise message.max.bytes \
             (and the broker's max.message.bytes), then replay"
        )))
    } else {
        None
    };
    let event = Event {
        id,
        event_id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload,
        topic,
        headers,
        correlation_id,
        idempotency_token,
        created_at,
        retry_count,
        max_retries,
        defect,
    };
    Ok((event, size))
}
