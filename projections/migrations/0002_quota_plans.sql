-- 0002: quota plans and per-user overrides (limits are data, not code).
--
-- A user without a user_quotas row gets the plan named by MLP_DEFAULT_PLAN (default 'free').
-- Limits are non-negative and at most 2^53-1: the Redis ledger computes in Lua numbers (doubles).
-- These tables are configuration, not read models: `mlp replay` never touches them.

CREATE TABLE quota_plans (
    name                   text        PRIMARY KEY CHECK (name ~ '^[a-z0-9_-]{1,32}$'),
    tokens_per_day         bigint      NOT NULL CHECK (tokens_per_day BETWEEN 0 AND 9007199254740991),
    tokens_per_month       bigint      NOT NULL CHECK (tokens_per_month BETWEEN 0 AND 9007199254740991),
    requests_per_minute    bigint      NOT NULL CHECK (requests_per_minute BETWEEN 0 AND 9007199254740991),
    max_tokens_per_request bigint      NOT NULL CHECK (max_tokens_per_request BETWEEN 0 AND 9007199254740991),
    description            text        NOT NULL DEFAULT '',
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- free keeps the seed's 100,000 tokens/day; the others are starting points for operators to tune.
INSERT INTO quota_plans (name, tokens_per_day, tokens_per_month, requests_per_minute, max_tokens_per_request, description)
VALUES
    ('free',          100000,     1000000,   60, 1024, 'default plan for unregistered users'),
    ('pro',          2000000,    40000000,  600, 4096, ''),
    ('enterprise',  50000000,  1000000000, 6000, 4096, '');

-- NULL override = the plan's value.
CREATE TABLE user_quotas (
    user_id                text        PRIMARY KEY CHECK (user_id ~ '^[A-Za-z0-9_:@-]{1,128}$'),
    plan                   text        NOT NULL REFERENCES quota_plans (name) ON UPDATE CASCADE,
    tokens_per_day         bigint      CHECK (tokens_per_day BETWEEN 0 AND 9007199254740991),
    tokens_per_month       bigint      CHECK (tokens_per_month BETWEEN 0 AND 9007199254740991),
    requests_per_minute    bigint      CHECK (requests_per_minute BETWEEN 0 AND 9007199254740991),
    max_tokens_per_request bigint      CHECK (max_tokens_per_request BETWEEN 0 AND 9007199254740991),
    updated_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX user_quotas_plan ON user_quotas (plan);
