-- Events that failed for good: the outbox columns, plus when and why.
-- `outbox-relay dead-letter replay` moves a row back into the outbox with its id,
-- event_id and idempotency_token kept, so consumers can still deduplicate.
CREATE TABLE IF NOT EXISTS outbox_dead_letter (
    id                bigint      PRIMARY KEY,
    event_id          uuid        NOT NULL,
    aggregate_type    text        NOT NULL,
    aggregate_id      text        NOT NULL,
    event_type        text        NOT NULL,
    payload           jsonb,
    topic             text,
    headers           jsonb,
    correlation_id    text,
    idempotency_token text,
    created_at        timestamptz NOT NULL,
    status            varchar(20) DEFAULT 'dead',
    retry_count       integer     NOT NULL DEFAULT 0,
    max_retries       integer,
    last_error        text,
    next_attempt_at   timestamptz,
    published_at      timestamptz,
    failed_at         timestamptz NOT NULL DEFAULT now(),
    error             text        NOT NULL
);

CREATE INDEX IF NOT EXISTS outbox_dead_letter_aggregate_idx
    ON outbox_dead_letter (aggregate_type, aggregate_id);
CREATE INDEX IF NOT EXISTS outbox_dead_letter_failed_at_idx
    ON outbox_dead_letter (failed_at);
