-- Creates the job control tables in schema freight_kpi: the table leases that replace
-- advisory locks where those cannot be trusted (behind a transaction pooler), the
-- holder of every run this service starts (so a later instance can mark a dead one
-- ABANDONED), the scheduler's registrations and the slots it claimed.
--
-- Nothing here touches the application's tables. Every object is created only when
-- absent, so the file can run twice.

CREATE SCHEMA IF NOT EXISTS freight_kpi;

-- One row per job name. A holder owns the lease while holder_id is set and expires_at
-- lies in the future by the database's clock. Each acquisition increments generation,
-- which is the fencing token that writes under the lease compare with.
CREATE TABLE IF NOT EXISTS freight_kpi.job_lease (
    job_name    text PRIMARY KEY,
    holder_id   text,
    generation  bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz,
    renewed_at  timestamptz,
    expires_at  timestamptz
);

-- The lock holder of each "JobRunLog" row that this service wrote as RUNNING. Rows of
-- the application's own jobs have no entry here and are never marked ABANDONED by
-- this service. There is no foreign key, because the application owns "JobRunLog"
-- and its id need not be unique-indexed there.
CREATE TABLE IF NOT EXISTS freight_kpi.job_run_holder (
    run_id        bigint PRIMARY KEY,
    job_name      text NOT NULL,
    holder_id     text NOT NULL,
    lock_mode     text NOT NULL,
    fencing_token bigint,
    backend_pid   integer,
    slot          timestamptz
);

-- When the scheduler first ran a job with its current schedule. Slots before this time
-- are never caught up, so a first start does not run a slot that passed before the
-- service existed.
CREATE TABLE IF NOT EXISTS freight_kpi.job_schedule (
    job_name      text PRIMARY KEY,
    cron          text NOT NULL,
    time_zone     text NOT NULL,
    registered_at timestamptz NOT NULL
);

-- One row per scheduled slot that an instance claimed. The primary key makes the claim
-- exclusive: the instance whose insert succeeds runs the slot and the others skip it.
CREATE TABLE IF NOT EXISTS freight_kpi.job_slot (
    job_name      text NOT NULL,
    scheduled_for timestamptz NOT NULL,
    claimed_by    text NOT NULL,
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    run_id        bigint,
    PRIMARY KEY (job_name, scheduled_for)
);
