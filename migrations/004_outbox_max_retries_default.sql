-- max_retries: NULL means "the relay's configured max_retries" (OUTBOX_MAX_RETRIES).
-- 001 gives the column DEFAULT 3, as the platform plan wrote it; with that default every
-- row carried 3 and the relay's setting could never apply. A service that wants a
-- different limit for one event still sets the column explicitly.
ALTER TABLE outbox ALTER COLUMN max_retries DROP DEFAULT;
