-- 0001: the event store (append-only, and the projections' inbox) and the read models.
--
-- The event store doubles as the projection inbox: the collector inserts a batch of events with
-- INSERT ... ON CONFLICT DO NOTHING RETURNING event_id and, in the SAME transaction, projects only
-- the events that this insert newly stored. A redelivered or replayed message therefore changes
-- nothing, and there is no separate tracking table nor a bigserial checkpoint (positions of
-- concurrent writers commit out of order, so "everything below N is done" would be false).
-- Read models are rebuildable from event_store at any time (`mlp replay`): keep foreign keys and
-- views off them, because replay swaps them for freshly built tables.

CREATE TABLE event_store (
    position    bigserial   PRIMARY KEY,
    event_id    uuid        NOT NULL UNIQUE,
    request_id  text        NOT NULL,
    type        text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    payload     jsonb       NOT NULL  -- the event exactly as it travelled (JSON), decodable by events.decode_event
);

-- A request's stream, in order.
CREATE INDEX event_store_stream ON event_store (request_id, occurred_at, event_id);

-- Exactly one outcome per request: a second terminal event (a redelivered request processed twice)
-- conflicts here, is dropped by ON CONFLICT DO NOTHING and is never projected.
CREATE UNIQUE INDEX event_store_one_outcome ON event_store (request_id)
    WHERE type IN ('InferenceCompleted', 'InferenceFailed', 'InferenceRejected');

-- Append-only: the store is the truth, so rows are never changed or removed by the platform.
CREATE FUNCTION event_store_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'event_store is append-only (% refused)', TG_OP;
END;
$$;
CREATE TRIGGER event_store_append_only BEFORE UPDATE OR DELETE ON event_store
    FOR EACH ROW EXECUTE FUNCTION event_store_append_only();

-- The status ordering of events.status.STATUS_RANK, for upserts that must only move forward even
-- when collectors run concurrently (a test checks it matches the Python table).
CREATE FUNCTION mlp_status_rank(status text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE status WHEN 'queued' THEN 0 WHEN 'running' THEN 1
                       WHEN 'completed' THEN 2 WHEN 'failed' THEN 2 WHEN 'rejected' THEN 2 END;

-- One row per request: its lifecycle. Every column converges whatever the order of its events:
-- status by rank, timestamps by least/greatest, the other fields are filled once.
CREATE TABLE inference_requests (
    request_id      text        PRIMARY KEY,
    user_id         text        NOT NULL,
    model           text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed', 'rejected')),
    prompt          text,
    max_tokens      integer,
    source          text,
    trace_id        text,
    reserved_tokens integer,     -- from InferenceStarted: the open reservation of a running request
    error_code      text,
    error_message   text,
    reject_reason   text,
    created_at      timestamptz,  -- InferenceRequested.occurred_at
    started_at      timestamptz,  -- the earliest InferenceStarted
    finished_at     timestamptz,  -- the outcome's occurred_at
    updated_at      timestamptz NOT NULL  -- occurred_at of the latest event (deterministic, so replay equals live)
);
CREATE INDEX inference_requests_user ON inference_requests (user_id, created_at);
CREATE INDEX inference_requests_running ON inference_requests (user_id) WHERE status = 'running';

CREATE TABLE inference_results (
    request_id        text             PRIMARY KEY,
    completion        text             NOT NULL,
    prompt_tokens     integer          NOT NULL,
    completion_tokens integer          NOT NULL,
    total_tokens      integer          NOT NULL,
    latency_ms        double precision NOT NULL,
    completed_at      timestamptz      NOT NULL
);

-- The usage ledger: one row per completed request, so tokens are charged exactly once.
CREATE TABLE token_usage (
    request_id        text        PRIMARY KEY,
    user_id           text        NOT NULL,
    model             text        NOT NULL,
    prompt_tokens     integer     NOT NULL,
    completion_tokens integer     NOT NULL,
    total_tokens      integer     NOT NULL,
    occurred_at       timestamptz NOT NULL
);
CREATE INDEX token_usage_user_time ON token_usage (user_id, occurred_at);
-- The quota rebuild and the token-rate metric filter on time alone.
CREATE INDEX token_usage_time ON token_usage (occurred_at);

-- Per user, UTC day and model; maintained from the rows newly inserted into token_usage.
CREATE TABLE token_usage_daily (
    user_id           text    NOT NULL,
    day               date    NOT NULL,
    model             text    NOT NULL,
    prompt_tokens     bigint  NOT NULL,
    completion_tokens bigint  NOT NULL,
    total_tokens      bigint  NOT NULL,
    requests          integer NOT NULL,
    PRIMARY KEY (user_id, day, model)
);
