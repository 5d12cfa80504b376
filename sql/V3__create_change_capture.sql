-- Creates the service's own schema "freight_kpi" and the change capture on "Load":
-- the durable change queue, the table of listeners that writers wake, the table of
-- buckets whose recompute failed, and the statement-level triggers that fill the queue.
--
-- Nothing here touches the application's rows. Every object is created with IF NOT
-- EXISTS or replaced, so the file can run twice.

CREATE SCHEMA IF NOT EXISTS freight_kpi;

-- One row per (venture, UTC day) bucket that a committed statement touched. A row whose
-- venture_id and day are both NULL stands for every bucket: a TRUNCATE writes it.
-- Rows are appended by writers and deleted by the service in the transaction that
-- recomputes their buckets, so a change is never lost between the two.
CREATE TABLE IF NOT EXISTS freight_kpi.change_queue (
    id          bigserial PRIMARY KEY,
    venture_id  integer,
    day         date,
    enqueued_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    CONSTRAINT change_queue_key_complete CHECK ((venture_id IS NULL) = (day IS NULL))
);

-- One row per running listener. A committing writer notifies only the channels of
-- armed listeners, and a listener disarms itself as soon as it wakes, so a burst of
-- writes costs a few NOTIFYs per listener cycle instead of one per transaction. NOTIFY
-- takes a cluster-wide lock at commit, which would otherwise serialize every writer.
CREATE TABLE IF NOT EXISTS freight_kpi.listener (
    listener_id  text PRIMARY KEY,
    channel      text NOT NULL,
    armed        boolean NOT NULL DEFAULT false,
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- Buckets whose recompute failed, such as totals that overflow the KPI columns. They are
-- retried with a growing delay and stay here, with the error, until a recompute succeeds.
CREATE TABLE IF NOT EXISTS freight_kpi.failed_bucket (
    venture_id      integer NOT NULL,
    day             date NOT NULL,
    attempts        integer NOT NULL,
    last_error      text NOT NULL,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL,
    PRIMARY KEY (venture_id, day)
);

-- Writers of "Load" run the triggers below with their own privileges, whatever role the
-- application uses, so they need to append to the queue and read the listeners.
GRANT USAGE ON SCHEMA freight_kpi TO PUBLIC;
GRANT INSERT ON freight_kpi.change_queue TO PUBLIC;
GRANT USAGE ON SEQUENCE freight_kpi.change_queue_id_seq TO PUBLIC;
GRANT SELECT ON freight_kpi.listener TO PUBLIC;

-- Sends one empty notification per armed channel. The payload stays empty, so no
-- statement, however large, comes near the 8000-byte limit of NOTIFY.
--
-- At REPEATABLE READ and SERIALIZABLE, a writer reads the listener table as of its
-- snapshot, which can predate a listener arming itself. Such writers therefore notify
-- every registered channel. Writers at READ COMMITTED, the default, read the flag as
-- it is at commit.
CREATE OR REPLACE FUNCTION freight_kpi.wake_listeners() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    armed_channel text;
    fresh_read boolean := current_setting('transaction_isolation') = 'read committed';
BEGIN
    FOR armed_channel IN
        SELECT DISTINCT channel FROM freight_kpi.listener WHERE armed OR NOT fresh_read
    LOOP
        PERFORM pg_notify(armed_channel, '');
    END LOOP;
END
$$;

-- Returns true for the first queue row of a transaction and false for the others,
-- so the deferred trigger below is queued once per transaction. The flag is a
-- transaction-local setting, so a rolled-back savepoint resets it together with the
-- rows it covered.
CREATE OR REPLACE FUNCTION freight_kpi.first_change_in_transaction() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('freight_kpi.wake_pending', true) = 'on' THEN
        RETURN false;
    END IF;
    PERFORM set_config('freight_kpi.wake_pending', 'on', true);
    RETURN true;
END
$$;

CREATE OR REPLACE FUNCTION freight_kpi.wake_at_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM freight_kpi.wake_listeners();
    RETURN NULL;
END
$$;

-- Whether to notify is decided at commit, not when the statement runs: a transaction
-- that wrote "Load" while the listener was busy, and commits after the listener armed
-- itself and looked at the queue, still wakes it. Deciding earlier would leave such a
-- change to the fallback poll.
DROP TRIGGER IF EXISTS freight_kpi_wake_at_commit ON freight_kpi.change_queue;
CREATE CONSTRAINT TRIGGER freight_kpi_wake_at_commit
    AFTER INSERT ON freight_kpi.change_queue
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (freight_kpi.first_change_in_transaction())
    EXECUTE FUNCTION freight_kpi.wake_at_commit();

-- The bucket of a load is its venture and the UTC calendar day of "createdAt", whatever
-- the TimeZone setting of the writing session. For a timestamptz column that is the
-- day at UTC. An ORM may declare the column timestamp without time zone and store UTC
-- wall-clock values in it (Prisma's DateTime does), so for that type the stored value's
-- own day is the UTC day. The overload that matches the column's type is chosen when
-- a statement is planned, and both are inlined.
CREATE OR REPLACE FUNCTION freight_kpi.utc_day(moment timestamptz) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT (moment AT TIME ZONE 'UTC')::date $$;

CREATE OR REPLACE FUNCTION freight_kpi.utc_day(moment timestamp) RETURNS date
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT moment::date $$;

GRANT EXECUTE ON FUNCTION freight_kpi.utc_day(timestamptz) TO PUBLIC;
GRANT EXECUTE ON FUNCTION freight_kpi.utc_day(timestamp) TO PUBLIC;
CREATE OR REPLACE FUNCTION freight_kpi.capture_load_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO freight_kpi.change_queue (venture_id, day)
    SELECT DISTINCT "ventureId", freight_kpi.utc_day("createdAt")
    FROM inserted_loads;

    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION freight_kpi.capture_load_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO freight_kpi.change_queue (venture_id, day)
    SELECT DISTINCT "ventureId", freight_kpi.utc_day("createdAt")
    FROM deleted_loads;

    RETURN NULL;
END
$$;

-- An update enqueues the buckets whose multiset of KPI inputs changed: the old and the
-- new bucket of each row whose inputs differ. EXCEPT ALL compares multisets, so an
-- update that only touches other columns ("updatedAt", say) enqueues nothing. Only
-- whether "billingDate" is set matters to a KPI, and so only that is compared.
CREATE OR REPLACE FUNCTION freight_kpi.capture_load_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    WITH new_inputs AS (
        SELECT "ventureId" AS venture_id, freight_kpi.utc_day("createdAt") AS day,
               status, "billAmount", "costAmount", "billingDate" IS NOT NULL AS billed
        FROM updated_loads_new
    ),
    old_inputs AS (
        SELECT "ventureId" AS venture_id, freight_kpi.utc_day("createdAt") AS day,
               status, "billAmount", "costAmount", "billingDate" IS NOT NULL AS billed
        FROM updated_loads_old
    ),
    changed AS (
        (SELECT * FROM new_inputs EXCEPT ALL SELECT * FROM old_inputs)
        UNION ALL
        (SELECT * FROM old_inputs EXCEPT ALL SELECT * FROM new_inputs)
    )
    INSERT INTO freight_kpi.change_queue (venture_id, day)
    SELECT DISTINCT venture_id, day FROM changed;

    RETURN NULL;
END
$$;

-- TRUNCATE has no transition table, so it enqueues the marker for every bucket.
CREATE OR REPLACE FUNCTION freight_kpi.capture_load_truncate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO freight_kpi.change_queue (venture_id, day) VALUES (NULL, NULL);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS freight_kpi_capture_insert ON "Load";
CREATE TRIGGER freight_kpi_capture_insert
    AFTER INSERT ON "Load"
    REFERENCING NEW TABLE AS inserted_loads
    FOR EACH STATEMENT EXECUTE FUNCTION freight_kpi.capture_load_insert();

DROP TRIGGER IF EXISTS freight_kpi_capture_update ON "Load";
CREATE TRIGGER freight_kpi_capture_update
    AFTER UPDATE ON "Load"
    REFERENCING OLD TABLE AS updated_loads_old NEW TABLE AS updated_loads_new
    FOR EACH STATEMENT EXECUTE FUNCTION freight_kpi.capture_load_update();

DROP TRIGGER IF EXISTS freight_kpi_capture_delete ON "Load";
CREATE TRIGGER freight_kpi_capture_delete
    AFTER DELETE ON "Load"
    REFERENCING OLD TABLE AS deleted_loads
    FOR EACH STATEMENT EXECUTE FUNCTION freight_kpi.capture_load_delete();

DROP TRIGGER IF EXISTS freight_kpi_capture_truncate ON "Load";
CREATE TRIGGER freight_kpi_capture_truncate
    AFTER TRUNCATE ON "Load"
    FOR EACH STATEMENT EXECUTE FUNCTION freight_kpi.capture_load_truncate();
