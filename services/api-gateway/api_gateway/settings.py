"""The gateway's settings: every field is also an environment variable (upper case).

The key settings (``API_KEY_PEPPER``, ``API_TIERS``, ``API_DEFAULT_TIER``,
``API_KEY_CACHE_TTL_SECONDS``) are shared with the WebSocket broadcaster and ``tokvel keys``
through :class:`tokvel_common.apikeys.ApiKeySettings`.
"""

from __future__ import annotations

from pydantic import Field

from tokvel_common.apikeys import ApiKeySettings


class GatewaySettings(ApiKeySettings):
    host: str = Field(
        default="0.0.0.0",  # noqa: S104 - the API is served to clients from outside the pod
        description="Address the REST API listens on.",
    )
    port: int = Field(default=8080, ge=0, le=65535, description="Port of the REST API.")
    access_log: bool = Field(default=True, description="Log one line per request.")
    dashboard_ws_url: str = Field(
        default="",
        pattern=r"^(wss?://[^\s'\";]+)?$",
        description="WebSocket URL the dashboard at / connects to (the ws-broadcaster's "
        "/v1/ws); empty: ws://<host the page was loaded from>:8081/v1/ws (wss:// under https).",
    )
    redis_timeout_seconds: float = Field(
        default=0.25,
        gt=0,
        description="Longest wait for one Redis round trip before the request goes on without "
        "Redis (PostgreSQL for data, the local limiter for rate limits).",
    )
    redis_retry_seconds: float = Field(
        default=1.0,
        ge=0,
        description="After a Redis failure, how long requests skip Redis before trying again.",
    )
    db_timeout_seconds: float = Field(
        default=5.0, gt=0, description="Longest wait for PostgreSQL (connection and query)."
    )
    db_pool_max_size: int = Field(default=10, ge=1, description="PostgreSQL connections.")
    quota_flush_interval_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often counted requests are added to the monthly usage in PostgreSQL.",
    )
    rate_limit_local_divisor: int = Field(
        default=1,
        ge=1,
        description="While Redis is down each replica enforces per-minute limit / this value "
        "on its own (set it to the replica count to keep the global rate at the limit).",
    )
    local_cache_seconds: float = Field(
        default=1.0,
        ge=0,
        le=5,
        description="How long a replica keeps a token or velocity answer read from Redis in "
        "process (dropped at once when the writer announces new data; this bounds the delay "
        "when an announcement is lost). 0 reads Redis on every request.",
    )
    api_key_stale_seconds: float = Field(
        default=60.0,
        ge=0,
        description="While PostgreSQL is down, how long a key checked before stays usable.",
    )
