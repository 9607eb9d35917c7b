-- The platform plan's enhancements, for outbox tables that predate the relay.
-- Safe on a table created by 000_outbox.sql too: every change is IF NOT EXISTS.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS idempotency_token TEXT UNIQUE;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS status VARCHAR(20) DEFAULT 'pending';
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS max_retries INTEGER DEFAULT 3;

-- Columns the relay needs that an older table may lack.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS event_id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS topic text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS headers jsonb;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS correlation_id text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS retry_count integer NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS published_at timestamptz;
