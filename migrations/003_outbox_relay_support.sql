-- What the relay needs to claim quickly and wake on commit.

-- Rows waiting for a retry hold back their aggregate's later rows; this partial index
-- finds them cheaply (it is empty while nothing is failing).
CREATE INDEX IF NOT EXISTS outbox_waiting_idx
    ON outbox (aggregate_type, aggregate_id, id)
    WHERE next_attempt_at IS NOT NULL;

-- Wake the relay at commit: one notification per inserting statement, delivered only
-- if the transaction commits. The payload is the schema, so one listener serves many.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS outbox_notify ON outbox;
CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- A queue table: rows are inserted and deleted all day. Vacuum it often so dead
-- tuples do not slow the claim query.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000);
