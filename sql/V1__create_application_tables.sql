-- Creates the application's tables and types that this service reads and writes:
-- "LoadStatus", "Load", "FreightKpiDaily", "JobName" and "JobRunLog".
--
-- The owning application (a Prisma schema) normally creates these first, so every
-- object is created only when absent and an existing one is left as it is. Running
-- this file twice changes nothing.

DO $$
BEGIN
    IF to_regtype('"LoadStatus"') IS NULL THEN
        CREATE TYPE "LoadStatus" AS ENUM (
            'OPEN', 'WORKING', 'QUOTED', 'COVERED', 'IN_TRANSIT', 'DELIVERED', 'LOST', 'CANCELLED'
        );
    END IF;

    IF to_regtype('"JobName"') IS NULL THEN
        CREATE TYPE "JobName" AS ENUM (
            'INCENTIVE_DAILY_COMMIT', 'CHURN_RECALC', 'TASK_GENERATION', 'KPI_AGGREGATION'
        );
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS "Load" (
    id            bigserial PRIMARY KEY,
    "ventureId"   integer NOT NULL,
    status        "LoadStatus" NOT NULL DEFAULT 'OPEN',
    "billAmount"  numeric(12, 2),
    "costAmount"  numeric(12, 2),
    "billingDate" timestamptz,
    "createdAt"   timestamptz NOT NULL DEFAULT now(),
    "updatedAt"   timestamptz NOT NULL DEFAULT now()
);

-- One bucket's recompute reads the loads of one venture created within one UTC day,
-- which an index led by ("ventureId", "createdAt") turns into a single range scan. An
-- existing index of that shape, under any name, is used as it is. On a large existing
-- table, create it with CREATE INDEX CONCURRENTLY before migrating, since this plain
-- CREATE INDEX blocks writers while it builds.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index i
        WHERE i.indrelid = '"Load"'::regclass
          AND i.indnkeyatts >= 2
          AND i.indexprs IS NULL
          AND i.indpred IS NULL
          AND i.indkey[0] = (SELECT attnum FROM pg_attribute
                             WHERE attrelid = i.indrelid AND attname = 'ventureId')
          AND i.indkey[1] = (SELECT attnum FROM pg_attribute
                             WHERE attrelid = i.indrelid AND attname = 'createdAt')
    ) THEN
        CREATE INDEX "Load_ventureId_createdAt_idx" ON "Load" ("ventureId", "createdAt");
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS "FreightKpiDaily" (
    id                    bigserial PRIMARY KEY,
    "ventureId"           integer NOT NULL,
    date                  date NOT NULL,
    "loadsInbound"        integer NOT NULL DEFAULT 0,
    "loadsQuoted"         integer NOT NULL DEFAULT 0,
    "loadsCovered"        integer NOT NULL DEFAULT 0,
    "loadsLost"           integer NOT NULL DEFAULT 0,
    "totalRevenue"        numeric(14, 2) NOT NULL DEFAULT 0,
    "totalCost"           numeric(14, 2) NOT NULL DEFAULT 0,
    "totalProfit"         numeric(14, 2) NOT NULL DEFAULT 0,
    "avgMarginPct"        numeric(7, 2),
    "activeShippers"      integer,
    "newShippers"         integer,
    "churnedShippers"     integer,
    "reactivatedShippers" integer,
    "atRiskShippers"      integer,
    "activeCarriers"      integer,
    "newCarriers"         integer,
    "updatedAt"           timestamptz NOT NULL DEFAULT now()
);

-- The upsert of a bucket needs this key; an existing table may already have it under
-- another name, which is why the check looks at the columns, not the name.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index i
        WHERE i.indrelid = '"FreightKpiDaily"'::regclass
          AND i.indisunique
          AND i.indnkeyatts = 2
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text)
               FROM pg_attribute a
               WHERE a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)) = ARRAY['date', 'ventureId']
    ) THEN
        CREATE UNIQUE INDEX "FreightKpiDaily_ventureId_date_key" ON "FreightKpiDaily" ("ventureId", date);
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS "JobRunLog" (
    id           bigserial PRIMARY KEY,
    "jobName"    "JobName" NOT NULL,
    status       text NOT NULL,
    "startedAt"  timestamptz NOT NULL,
    "endedAt"    timestamptz,
    "durationMs" integer,
    "statsJson"  jsonb,
    error        text
);

CREATE INDEX IF NOT EXISTS "JobRunLog_jobName_startedAt_idx" ON "JobRunLog" ("jobName", "startedAt");
