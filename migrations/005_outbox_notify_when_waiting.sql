-- Wake the relay only while it waits. A transaction that queued a NOTIFY takes a
-- cluster-wide lock before it commits and holds it until its commit is durable, so a
-- NOTIFY on every insert lines up the commits of every service on the server. The
-- relay needs a notification only when it has nothing to do: while it waits for this
-- schema's rows it holds the advisory lock (185359900, hashtext(schema)) exclusively,
-- and an inserting statement notifies only when it cannot take that lock shared.
--
-- The lost wake-up is closed by the lock: an insert that did not notify holds the
-- lock shared until its transaction ends, so the relay gets it (and starts to wait)
-- only after every such insert has committed or rolled back, and then claims once more
-- before it sleeps. Inserts after that see the lock held and notify.
--
-- The test is the trigger's WHEN condition, evaluated without calling the trigger
-- function, with the key written in as a number: on the services' commit path a
-- busy relay costs one shared advisory lock per inserting statement.
-- The schema's name is hashed now: a schema renamed later needs this file again
-- (delete its row from outbox_relay_migrations and rerun migrate).
--
-- Replaces the trigger of 003, and its function with the one of 003. Idempotent.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('outbox_relay', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

DO $$
BEGIN
    EXECUTE 'DROP TRIGGER IF EXISTS outbox_notify ON outbox';
    EXECUTE format(
        'CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT '
        'WHEN (NOT pg_try_advisory_xact_lock_shared(185359900, %s)) '
        'EXECUTE FUNCTION outbox_notify()',
        hashtext(current_schema()));
END
$$;
