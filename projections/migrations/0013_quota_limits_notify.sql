-- 0013: a notification for every change of a user's limits, so the gateways and workers can keep
-- them cached for minutes instead of re-reading them every few seconds (quota.limits_follower).
--
-- A change of a user_quotas row sends NOTIFY mlp_quota_limits with its user_id as the payload; a change
-- of quota_plans (any plan: it may be the default plan of many users), or a TRUNCATE of either table,
-- sends '*'. Both are delivered when the writing transaction commits. Notifications are only a wake-up: a follower that was not listening
-- forgets everything it cached when it listens again, and its cache entries still expire.

CREATE FUNCTION quota_limits_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_LEVEL = 'ROW' THEN  -- a user_quotas row
        IF TG_OP <> 'INSERT' THEN
            PERFORM pg_notify('mlp_quota_limits', OLD.user_id);
        END IF;
        IF TG_OP <> 'DELETE' THEN
            PERFORM pg_notify('mlp_quota_limits', NEW.user_id);
        END IF;
        RETURN NULL;
    END IF;
    PERFORM pg_notify('mlp_quota_limits', '*');
    RETURN NULL;
END;
$$;

CREATE TRIGGER user_quotas_notify AFTER INSERT OR UPDATE OR DELETE ON user_quotas
    FOR EACH ROW EXECUTE FUNCTION quota_limits_notify();

CREATE TRIGGER user_quotas_truncate_notify AFTER TRUNCATE ON user_quotas
    FOR EACH STATEMENT EXECUTE FUNCTION quota_limits_notify();

CREATE TRIGGER quota_plans_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota_plans
    FOR EACH STATEMENT EXECUTE FUNCTION quota_limits_notify();
