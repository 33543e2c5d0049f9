-- 0007: one InferenceRequested per request stream (docs/bus.md, "Request identity").
--
-- A request id names one request: the first InferenceRequested of a stream is the request, and a later
-- one under the same id with another event_id (another prompt, another tenant that learned the id) is
-- never stored: it conflicts here and is dropped by the collector's INSERT ... ON CONFLICT DO NOTHING,
-- like a second outcome (event_store_one_outcome). The worker answers its publisher alone
-- (duplicate_request_id); the stream, its read model and a replay keep the first request only.
-- A redelivery (the same event_id) was a duplicate already.

DO $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM event_store WHERE type = 'InferenceRequested' GROUP BY request_id HAVING count(*) > 1
    ) THEN
        RAISE EXCEPTION 'event_store holds request streams with more than one InferenceRequested (see '
            'SELECT request_id FROM event_store WHERE type = ''InferenceRequested'' GROUP BY 1 HAVING count(*) > 1); '
            'the store is append-only: decide what to keep (mlp replay into a fresh database) before migrating';
    END IF;
END;
$$;

CREATE UNIQUE INDEX event_store_one_request ON event_store (request_id) WHERE type = 'InferenceRequested';
