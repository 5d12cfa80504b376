-- Adds KPI_AGGREGATION to an existing "JobName" enum that lacks it, since this
-- service logs its reconcile runs under that name. IF NOT EXISTS makes it a no-op
-- on a type that V1 created or that already has the value, so it can run twice.
--
-- It stands alone because a value added by ALTER TYPE cannot be used in the
-- transaction that adds it.

ALTER TYPE "JobName" ADD VALUE IF NOT EXISTS 'KPI_AGGREGATION';
