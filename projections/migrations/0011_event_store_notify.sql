-- 0011: a notification for every event newly stored, so read API replicas follow request streams live
-- (GET /api/v1/inference/{id}/stream) without polling the store.
--
-- Each row newly inserted into event_store sends NOTIFY mlp_event_store with its request_id as the
-- payload, delivered when the inserting transaction commits (so a listener that re-reads finds the row).
-- A row dropped by ON CONFLICT DO NOTHING (a redelivery, a second outcome) is not inserted and sends
-- nothing; Postgres folds identical notifications of one transaction into one. Notifications are only
-- a wake-up: the store stays the truth, and a listener that missed one catches up on its next re-read.

CREATE FUNCTION event_store_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('mlp_event_store', NEW.request_id);
    RETURN NULL;
END;
$$;

CREATE TRIGGER event_store_notify AFTER INSERT ON event_store
    FOR EACH ROW EXECUTE FUNCTION event_store_notify();
