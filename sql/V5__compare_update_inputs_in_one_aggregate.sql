-- Makes the update capture cheaper for writers of "Load".
--
-- V3 compared the old and the new KPI inputs of an UPDATE with two EXCEPT ALL, a
-- UNION ALL and a DISTINCT. This version counts each (bucket, inputs) tuple +1 on the
-- new side and -1 on the old side in one aggregate. A tuple whose count is not zero is
-- in one multiset more often than in the other, which is what the two EXCEPT ALL
-- found, so the same buckets are enqueued.
--
-- A loop of 20,000 single-row updates in one session (1 million loads, PostgreSQL 15,
-- 2 cores) took 1,036, 900 and 880 ms with this form and 1,267, 993 and 965 ms with
-- V3's, in three interleaved rounds. Without triggers it took about 380 ms.

CREATE OR REPLACE FUNCTION freight_kpi.capture_load_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO freight_kpi.change_queue (venture_id, day)
    SELECT DISTINCT venture_id, day
    FROM (
        SELECT "ventureId" AS venture_id, freight_kpi.utc_day("createdAt") AS day,
               status, "billAmount", "costAmount", "billingDate" IS NOT NULL AS billed,
               1 AS side
        FROM updated_loads_new
        UNION ALL
        SELECT "ventureId", freight_kpi.utc_day("createdAt"),
               status, "billAmount", "costAmount", "billingDate" IS NOT NULL,
               -1
        FROM updated_loads_old
    ) AS inputs
    GROUP BY venture_id, day, status, "billAmount", "costAmount", billed
    HAVING sum(side) <> 0;

    RETURN NULL;
END
$$;
