-- 0010: cancel and deadlines (issue 15): the terminal statuses 'cancelled' and 'expired', their events
-- InferenceCancelled and InferenceExpired, and the plans' bounds on a submit's timeout_s.

-- The new outcomes are outcomes like the others: exactly one per request (a second terminal event of
-- any type conflicts here and is never projected).
DROP INDEX event_store_one_outcome;
CREATE UNIQUE INDEX event_store_one_outcome ON event_store (request_id)
    WHERE type IN ('InferenceCompleted', 'InferenceFailed', 'InferenceRejected', 'InferenceCancelled',
                   'InferenceExpired');

-- events.status.STATUS_RANK (a test checks they agree): both new statuses are terminal.
CREATE OR REPLACE FUNCTION mlp_status_rank(status text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE status WHEN 'queued' THEN 0 WHEN 'running' THEN 1
                       WHEN 'completed' THEN 2 WHEN 'failed' THEN 2 WHEN 'rejected' THEN 2
                       WHEN 'cancelled' THEN 2 WHEN 'expired' THEN 2 END;

-- The status check by whatever name it has (0001 named it implicitly; `mlp replay` restores the names).
DO $$
DECLARE
    found text;
BEGIN
    FOR found IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'inference_requests'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%status%'
    LOOP
        EXECUTE format('ALTER TABLE inference_requests DROP CONSTRAINT %I', found);
    END LOOP;
END;
$$;
ALTER TABLE inference_requests ADD CONSTRAINT inference_requests_status_check
    CHECK (status IN ('queued', 'running', 'completed', 'failed', 'rejected', 'cancelled', 'expired'));

-- A submit's timeout_s is at most the plan's max_timeout_s; default_timeout_s (NULL: none) applies to
-- a request that names no deadline. Plan-wide, not per-user overrides.
ALTER TABLE quota_plans
    ADD COLUMN max_timeout_s     integer NOT NULL DEFAULT 3600 CHECK (max_timeout_s BETWEEN 1 AND 604800),
    ADD COLUMN default_timeout_s integer CHECK (default_timeout_s BETWEEN 1 AND 604800);
ALTER TABLE quota_plans ADD CONSTRAINT quota_plans_default_timeout_within_max
    CHECK (default_timeout_s IS NULL OR default_timeout_s <= max_timeout_s);
