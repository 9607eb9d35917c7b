-- The outbox table: the contract between the services and the relay.
--
-- Unqualified names: run with search_path set to the service's schema, e.g.
--   PGOPTIONS='-c search_path=customer' psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/000_outbox.sql
-- `outbox-relay migrate` does that for every configured source.
--
-- A service INSERTs aggregate_type, aggregate_id, event_type, payload and, optionally,
-- topic, headers, correlation_id and idempotency_token. Every other column has a default
-- and belongs to the relay.
CREATE TABLE IF NOT EXISTS outbox (
    -- The order of events: assigned at INSERT, so it can commit out of order.
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id          uuid        NOT NULL DEFAULT gen_random_uuid(),
    aggregate_type    text        NOT NULL,
    aggregate_id      text        NOT NULL,
    event_type        text        NOT NULL,
    -- The event body; NULL is a tombstone (a null Kafka value).
    payload           jsonb,
    -- Overrides the source's configured topic for this row.
    topic             text,
    -- An object of string values, added as Kafka headers.
    headers           jsonb,
    correlation_id    text,
    idempotency_token text UNIQUE,
    created_at        timestamptz NOT NULL DEFAULT now(),
    -- Relay bookkeeping.
    status            varchar(20) DEFAULT 'pending',
    retry_count       integer     NOT NULL DEFAULT 0,
    max_retries       integer     DEFAULT 3,
    last_error        text,
    next_attempt_at   timestamptz,
    published_at      timestamptz
);
