-- 0009: signed webhooks (docs/http.md "Webhooks", docs/operations.md "Webhook dispatcher").
--
-- webhooks            a user's registered endpoints: the target URL, the event types it wants and its
--                     signing secret ("whsec_<base64>", Standard Webhooks). The secret is stored because
--                     the dispatcher signs with it (an HMAC key cannot be hashed away); it is a credential:
--                     returned once, at creation, never logged.
-- webhook_user_secrets one signing secret per user for the one-off `webhook_url` of a submit, created on
--                     first use; the user reads it with GET /api/v1/webhooks/signing-secret.
-- webhook_request_targets the one-off target of a request (written by the gateway before the publish, so
--                     it exists before any outcome of that request can).
-- webhook_deliveries  the delivery log and the dispatcher's work queue: one row per (endpoint, event),
--                     pending until a 2xx answer (delivered) or until the retry window is spent (failed).
--                     The dispatcher picks due rows with FOR UPDATE SKIP LOCKED, so replicas share them and
--                     a killed dispatcher leaves its rows pending, retried later with the same webhook-id.

CREATE TABLE webhooks (
    webhook_id text PRIMARY KEY,
    user_id    text NOT NULL,
    url        text NOT NULL,
    events     text[] NOT NULL,
    secret     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhooks_by_user ON webhooks (user_id, created_at);

CREATE TABLE webhook_user_secrets (
    user_id    text PRIMARY KEY,
    secret     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_request_targets (
    request_id text PRIMARY KEY,
    user_id    text NOT NULL,
    url        text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE webhook_deliveries (
    delivery_id      bigserial PRIMARY KEY,
    -- NULL: the one-off webhook_url of the request (signed with the user's signing secret)
    webhook_id       text REFERENCES webhooks (webhook_id) ON DELETE CASCADE,
    user_id          text NOT NULL,
    url              text NOT NULL,
    event_id         text NOT NULL,
    event_type       text NOT NULL,
    request_id       text NOT NULL,
    body             text NOT NULL,  -- the event JSON, byte for byte what every attempt sends and signs
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    retry_from       timestamptz NOT NULL DEFAULT now(),  -- the retry window's start (a replay restarts it)
    delivered_at     timestamptz,
    UNIQUE (webhook_id, event_id)
);
-- UNIQUE (webhook_id, event_id) does not hold for NULLs: the one-off target's own uniqueness.
CREATE UNIQUE INDEX webhook_deliveries_one_off ON webhook_deliveries (event_id) WHERE webhook_id IS NULL;
-- One outcome per request and endpoint, as event_store_one_outcome: a second terminal event of a request
-- (a redelivered request processed twice) is never delivered; the first one the dispatcher sees is.
CREATE UNIQUE INDEX webhook_deliveries_one_outcome ON webhook_deliveries (webhook_id, request_id);
CREATE UNIQUE INDEX webhook_deliveries_one_off_outcome ON webhook_deliveries (request_id) WHERE webhook_id IS NULL;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX webhook_deliveries_by_webhook ON webhook_deliveries (webhook_id, delivery_id);

-- The dispatcher's own role (k8s: the dispatcher Deployment's LOGIN user is a member), as 0005's.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mlp_dispatcher') THEN
        BEGIN
            CREATE ROLE mlp_dispatcher NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created meanwhile by the migration of another database
        END;
    END IF;
END
$$;
GRANT USAGE ON SCHEMA public TO mlp_dispatcher;

-- The gateway: the webhook routes (register, list, delete, the delivery log) and a submit's one-off target.
GRANT SELECT, INSERT, DELETE ON webhooks TO mlp_gateway;
GRANT SELECT, INSERT ON webhook_user_secrets TO mlp_gateway;
-- DELETE: a submit whose publish failed (not accepted) removes its one-off target again.
GRANT SELECT, INSERT, DELETE ON webhook_request_targets TO mlp_gateway;
GRANT SELECT ON webhook_deliveries TO mlp_gateway;
-- The dispatcher: reads the targets, enqueues and works off deliveries; `mlp webhooks replay` runs as the owner.
GRANT SELECT ON webhooks, webhook_request_targets, webhook_user_secrets TO mlp_dispatcher;
GRANT SELECT, INSERT, UPDATE ON webhook_deliveries TO mlp_dispatcher;
GRANT USAGE ON SEQUENCE webhook_deliveries_delivery_id_seq TO mlp_dispatcher;
