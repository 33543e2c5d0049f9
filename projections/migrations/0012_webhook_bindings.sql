-- 0012: webhooks cost nothing for the users who have none (docs/operations.md "Webhook dispatcher").
--
-- The queue mlp.webhooks is bound per user, to the outcome keys of the users who have a webhook
-- (events.topology.webhook_binding_keys); the dispatcher alone binds it, and records here which users it
-- has bound, and since when:
-- webhook_bindings    one row per user whose keys are bound (written after the bind, removed after the
--                     unbind). An outcome published between a webhook's creation and its user's binding
--                     went past the queue: the dispatcher enqueues those from event_store, the outcomes of
--                     the user that occurred between the webhook's created_at and the row's bound_at.
-- One-off webhook_url targets take no bus at all: the dispatcher scans webhook_request_targets, which
-- holds the targets whose request has no outcome yet (it deletes a target when it enqueues its delivery),
-- for requests with a terminal event in event_store.

CREATE TABLE webhook_bindings (
    user_id  text PRIMARY KEY,
    bound_at timestamptz NOT NULL DEFAULT now()
);

-- A user's outcomes by time, for that catch-up (event_store has no user column: the payload's user_id).
-- The terminal types of events.model, and the ones the wave 2 contracts add (cancelled, expired); a new
-- terminal type must be added here too (tests/integration/test_webhooks.py checks it).
CREATE INDEX event_store_outcomes_by_user ON event_store ((payload ->> 'user_id'), occurred_at)
    WHERE type IN ('InferenceCompleted', 'InferenceFailed', 'InferenceRejected', 'InferenceCancelled',
                   'InferenceExpired');

GRANT SELECT, INSERT, DELETE ON webhook_bindings TO mlp_dispatcher;
-- The catch-up and the one-off scan read the event store (the truth), never the read models.
GRANT SELECT ON event_store TO mlp_dispatcher;
-- The scan removes a one-off target once its delivery is enqueued.
GRANT DELETE ON webhook_request_targets TO mlp_dispatcher;
