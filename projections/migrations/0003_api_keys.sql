-- 0003: API keys as data (tenancy.key_store). Only an HMAC-SHA256 of each key is stored, peppered
-- with MLP_KEY_PEPPER (a Secret): a copy of this table alone authenticates nobody.
--
-- A key is usable while it is neither expired (expires_at) nor revoked (revoked_at); a rotated key's
-- revoked_at lies in the future (the end of its grace period) and replaced_by names its successor.
-- Configuration, not a read model: `mlp replay` never touches this table.

CREATE TABLE api_keys (
    key_id       text        PRIMARY KEY CHECK (key_id ~ '^[0-9a-f]{12}$'),
    user_id      text        NOT NULL CHECK (user_id ~ '^[A-Za-z0-9_:@-]{1,128}$'),
    scope        text        NOT NULL CHECK (scope IN ('user', 'admin')),
    key_hash     bytea       NOT NULL CHECK (octet_length(key_hash) = 32),
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz CHECK (expires_at > created_at),
    revoked_at   timestamptz,
    last_used_at timestamptz,
    replaced_by  text        REFERENCES api_keys (key_id)
);
CREATE INDEX api_keys_user ON api_keys (user_id, created_at DESC);
