-- 0005: one Postgres role per service, holding only what that service does.
--
-- The role that runs the migrations (the migrate Job) owns the schema: every table, the append-only
-- trigger and its function. The services connect as LOGIN users that are members of these NOLOGIN
-- group roles (k8s/postgres/service-roles.psql creates them; docs/kubernetes.md). They own nothing,
-- so none of them can ALTER, DROP or TRUNCATE a table, nor drop or disable event_store's trigger
-- (only an owner can); and none is granted UPDATE, DELETE or TRUNCATE on event_store.
--
--   mlp_gateway   reads the quota limits and the usage ledger (Redis counters are rebuilt from it)
--   mlp_worker    the same as the gateway: reserves quota before calling Triton
--   mlp_collector appends to event_store and writes the read models it projects
--   mlp_read_api  reads what it shows; writes nothing
--
-- Roles are cluster-wide while migrations run per database (many test databases share a server):
-- each role is created only when missing, and a concurrent creation by another database's migration
-- is not an error. Where the migrating user may not create roles (a managed Postgres), a DBA creates
-- them first and this migration only grants.
-- No default privileges: a table added by a later migration is granted there, explicitly
-- (tests/integration/test_service_roles.py fails on a table nobody decided about). `mlp replay`
-- rebuilds read models as new tables and copies the live tables' owner and grants onto them.

DO $$
DECLARE
    role_name text;
BEGIN
    FOREACH role_name IN ARRAY ARRAY['mlp_gateway', 'mlp_worker', 'mlp_collector', 'mlp_read_api'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role_name) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', role_name);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- created meanwhile by the migration of another database
            END;
        END IF;
    END LOOP;
END
$$;

-- PostgreSQL 15 and later already refuse CREATE in schema public to PUBLIC; older servers do not.
-- (Only the schema's owner can revoke it; for anyone else this is a warning, not an error.)
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO mlp_gateway, mlp_worker, mlp_collector, mlp_read_api;

-- Quota limits (quota.store.fetch_limits) and the ledger the Redis counters are rebuilt from
-- (quota.store.PostgresLedgerSource): every service that holds a QuotaService.
GRANT SELECT ON quota_plans, user_quotas, token_usage, inference_requests
    TO mlp_gateway, mlp_worker, mlp_collector, mlp_read_api;

-- The collector: INSERT ... ON CONFLICT DO NOTHING RETURNING event_id (SELECT for RETURNING), and the
-- projections' upserts (projections.postgres).
GRANT SELECT, INSERT ON event_store TO mlp_collector;
GRANT USAGE ON SEQUENCE event_store_position_seq TO mlp_collector;
GRANT INSERT, UPDATE ON inference_requests, token_usage_daily TO mlp_collector;
GRANT INSERT ON token_usage TO mlp_collector;
GRANT SELECT, INSERT ON inference_results TO mlp_collector;
GRANT SELECT ON token_usage_daily TO mlp_collector;

-- The read API: the request views, results, usage reports and a request's event history.
GRANT SELECT ON event_store, inference_results, token_usage_daily TO mlp_read_api;

-- The API key store (0003): both APIs authenticate callers and record when a key was last used; the
-- gateway's admin routes also create, revoke and rotate keys (never delete them, never change a hash).
GRANT SELECT ON api_keys TO mlp_gateway, mlp_read_api;
GRANT INSERT ON api_keys TO mlp_gateway;
GRANT UPDATE (revoked_at, replaced_by, last_used_at) ON api_keys TO mlp_gateway;
GRANT UPDATE (last_used_at) ON api_keys TO mlp_read_api;
