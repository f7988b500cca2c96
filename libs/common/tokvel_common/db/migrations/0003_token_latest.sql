-- The newest sample of every token, kept by the writer in the transaction that stores it.
--
-- Cache warming (top tokens by market cap), the catch-up after a Redis outage and token pages
-- need "the latest sample of each token"; over token_metrics that is a scan of every partition.
-- Here it is one row per token. `sample` is the token.metrics message as received (its numbers
-- are JSON numbers, which jsonb keeps exactly); `timestamp` only ever moves forward, so a
-- redelivered older sample never replaces a newer one.
CREATE TABLE token_latest (
    token_id        bigint PRIMARY KEY REFERENCES tokens (id),
    "timestamp"     timestamptz NOT NULL,
    cmc_rank        integer,
    market_cap_usd  numeric,
    sample          jsonb NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_token_latest_market_cap ON token_latest (market_cap_usd DESC NULLS LAST);
CREATE TRIGGER token_latest_touch_updated_at BEFORE UPDATE ON token_latest
    FOR EACH ROW EXECUTE FUNCTION tokvel_touch_updated_at();

-- When the metadata in a tokens row was fetched from CMC's info endpoint: a redelivered older
-- info message must not overwrite newer metadata.
ALTER TABLE tokens ADD COLUMN info_fetched_at timestamptz;
