-- The seed's four tables in PostgreSQL terms.
--
-- Numeric widths: every value CMC sends is stored in an unconstrained `numeric`, which holds any
-- magnitude and scale exactly (supplies above 10^14, prices below 10^-9, percent changes above
-- 10^6 %). The seed's DECIMAL(20,8) / DECIMAL(10,8) / DECIMAL(10,4) overflowed or zeroed those.
-- `velocity` is rounded to 8 decimals and capped at 100 by rule, so numeric(12,8) is exact for it;
-- the rolling means are computed doubles and are stored as double precision, bit for bit.

CREATE TABLE tokens (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cmc_id           bigint NOT NULL UNIQUE,
    symbol           text,
    name             text,
    slug             text,
    cmc_rank         integer,
    description      text,
    logo_url         text,
    website_url      text,
    twitter_url      text,
    reddit_url       text,
    github_url       text,
    whitepaper_url   text,
    date_added       timestamptz,
    is_active        boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_tokens_symbol ON tokens (upper(symbol));
CREATE INDEX idx_tokens_rank ON tokens (cmc_rank);

-- Keeps updated_at true on every change, whoever writes the row.
CREATE FUNCTION tokvel_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER tokens_touch_updated_at BEFORE UPDATE ON tokens
    FOR EACH ROW EXECUTE FUNCTION tokvel_touch_updated_at();

-- One row per (token, event time): the primary key is the unique (token_id, "timestamp") that
-- makes every write idempotent (INSERT ... ON CONFLICT DO NOTHING). Partitioned by event day.
CREATE TABLE token_metrics (
    token_id             bigint NOT NULL REFERENCES tokens (id),
    "timestamp"          timestamptz NOT NULL,
    cmc_rank             integer,
    price_usd            numeric,
    market_cap_usd       numeric,
    volume_24h_usd       numeric,
    circulating_supply   numeric,
    total_supply         numeric,
    max_supply           numeric,
    percent_change_1h    numeric,
    percent_change_24h   numeric,
    percent_change_7d    numeric,
    velocity             numeric(12, 8) NOT NULL CHECK (velocity >= 0 AND velocity <= 100),
    velocity_1h          double precision,
    velocity_4h          double precision,
    velocity_12h         double precision,
    velocity_24h         numeric(12, 8) NOT NULL CHECK (velocity_24h >= 0 AND velocity_24h <= 100),
    velocity_7d          double precision,
    trend                text NOT NULL
        CHECK (trend IN ('increasing', 'decreasing', 'stable', 'insufficient_data')),
    data_quality_score   numeric(3, 2) NOT NULL
        CHECK (data_quality_score >= 0 AND data_quality_score <= 1),
    quality_flags        text[] NOT NULL DEFAULT '{}',
    details              jsonb,
    created_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (token_id, "timestamp")
) PARTITION BY RANGE ("timestamp");
CREATE INDEX idx_token_metrics_timestamp ON token_metrics ("timestamp");
CREATE INDEX idx_token_metrics_velocity ON token_metrics ("timestamp", velocity DESC);

CREATE TABLE api_keys (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key_hash      text NOT NULL UNIQUE,  -- HMAC-SHA-256 (hex) with a server-side pepper
    key_prefix    text NOT NULL,         -- the non-secret start of the key, to tell keys apart
    name          text NOT NULL,
    tier          text NOT NULL DEFAULT 'basic',
    is_active     boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    last_used_at  timestamptz
);
CREATE INDEX idx_api_keys_active ON api_keys (is_active);
CREATE TRIGGER api_keys_touch_updated_at BEFORE UPDATE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION tokvel_touch_updated_at();

-- The durable monthly quota: one row per key and calendar month (UTC).
CREATE TABLE rate_limiting (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    api_key_id    bigint NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    period_start  date NOT NULL,
    usage_count   bigint NOT NULL DEFAULT 0 CHECK (usage_count >= 0),
    last_used_at  timestamptz,
    UNIQUE (api_key_id, period_start)
);
