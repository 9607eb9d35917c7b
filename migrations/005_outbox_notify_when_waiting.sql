-- Wake the relay only while it waits. A transaction that queued a NOTIFY takes a
-- cluster-wide lock before it commits and holds it until its commit is durable, so a
-- NOTIFY on every insert lines up the commits of every service on the server. The
-- relay needs a notification only when it has nothing to do: while it waits for this
-- schema's rows it holds the advisory lock (185359900, hashtext(schema)) exclusively,
-- and an insert notifies only when it cannot take that lock shared.
--
-- The lost wake-up is closed by the lock: an insert that did not notify holds the
-- lock shared until its transaction ends, so the relay gets it (and starts to wait)
-- only after every such insert has committed or rolled back, and then claims once more
-- before it sleeps. Inserts after that see the lock held and notify.
--
-- Replaces the function the trigger of 003 calls; the trigger stays. Idempotent.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(185359900, hashtext(TG_TABLE_SCHEMA)) THEN
        PERFORM pg_notify('outbox_relay', TG_TABLE_SCHEMA);
    END IF;
    RETURN NULL;
END
$$;
