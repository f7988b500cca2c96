"""The broadcaster's settings: every field is also an environment variable (upper case).

The API key settings (``API_KEY_PEPPER``, ``API_DEFAULT_TIER``, ``API_KEY_CACHE_TTL_SECONDS``...)
are shared with the gateway and ``tokvel keys`` through
:class:`tokvel_common.apikeys.ApiKeySettings`; the WebSocket limits of each tier are this
service's own (``WS_TIERS``), since the REST request limits say nothing about connections.
"""

from __future__ import annotations

import re
import secrets
import socket
from typing import Final, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokvel_common.apikeys import ApiKeySettings

# Instance ids appear in Redis set members ("{instance}:{serial}") and in SSCAN MATCH patterns:
# no colon (the separator) and no glob metacharacter.
INSTANCE_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class WsTierLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    max_subscriptions: int = Field(ge=1, description="Tokens one connection may subscribe to.")
    max_connections: int = Field(ge=1, description="Open connections of one key, all instances.")
    messages_per_second: float = Field(gt=0, description="Sustained client messages per second.")
    burst: int = Field(ge=1, description="Client messages allowed at once above the rate.")


DEFAULT_WS_TIERS: Final = {
    "basic": WsTierLimits(max_subscriptions=50, max_connections=5, messages_per_second=5, burst=20),
    "pro": WsTierLimits(
        max_subscriptions=500, max_connections=50, messages_per_second=20, burst=60
    ),
    "enterprise": WsTierLimits(
        max_subscriptions=5000, max_connections=5000, messages_per_second=50, burst=200
    ),
}


def default_instance_id() -> str:
    """Host name (the pod name on Kubernetes) plus a random part: unique per process start."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:40] or "ws"
    return f"{host}-{secrets.token_hex(4)}"


class WsSettings(ApiKeySettings):
    ws_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - WebSocket clients connect from outside the pod
        description="Address the WebSocket server listens on.",
    )
    ws_port: int = Field(default=8081, ge=0, le=65535, description="Port of /v1/ws and ops.")
    ws_allowed_origins: list[str] = Field(
        default_factory=list,
        description='JSON list of browser origins allowed to connect, e.g. ["https://app.'
        'example.com"]; "*" allows any. Clients that send no Origin (not browsers) are always '
        "allowed: the check protects browser users from cross-site WebSocket hijacking.",
    )
    ws_tiers: dict[str, WsTierLimits] = Field(
        default_factory=lambda: dict(DEFAULT_WS_TIERS),
        description='JSON: {"tier": {"max_subscriptions": n, "max_connections": n, '
        '"messages_per_second": x, "burst": n}, ...}; a tier missing here gets '
        "API_DEFAULT_TIER's limits.",
    )
    ws_send_queue_size: int = Field(
        default=512,
        ge=1,
        description="Messages queued for one connection; a client that lets it fill up (does "
        "not read) is dropped with close code 4008.",
    )
    ws_socket_send_buffer_bytes: int = Field(
        default=128 * 1024,
        ge=0,
        description="SO_SNDBUF of each client socket (0: the kernel's autotuning). Bounds the "
        "kernel memory of one client and how much a non-reading client absorbs before its "
        "queue fills.",
    )
    ws_max_message_bytes: int = Field(
        default=16 * 1024,
        ge=256,
        description="Largest client message; a larger one closes the connection with 1009.",
    )
    ws_heartbeat_seconds: float = Field(
        default=20.0,
        gt=0,
        description="Ping interval; a peer that has not answered (pong) within half of it is "
        "closed as dead.",
    )
    ws_resume_buffer_size: int = Field(
        default=32,
        ge=1,
        description="Updates kept per token for clients that resume (since_seq).",
    )
    ws_resume_max_entries: int = Field(
        default=100_000,
        ge=1,
        description="Updates kept in all (about 1.3 KB each); beyond it the least recently "
        "updated token's are dropped, and a resume past them gets a fresh snapshot.",
    )
    ws_instance_id: str = Field(
        default_factory=default_instance_id,
        description="This instance's id in Redis (ws_subs members are '{instance}:{serial}'). "
        "Unique per process by default.",
    )
    ws_instance_heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often the instance refreshes its heartbeat key."
    )
    ws_instance_ttl_seconds: float = Field(
        default=15.0,
        gt=0,
        description="TTL of the heartbeat key: an instance silent this long is declared dead "
        "and its ws_subs entries are swept by the others.",
    )
    ws_sweep_interval_seconds: float = Field(
        default=10.0, gt=0, description="How often dead instances are looked for."
    )
    ws_snapshot_timeout_seconds: float = Field(
        default=3.0, gt=0, description="Longest wait for snapshots (Redis, then PostgreSQL)."
    )
    ws_snapshot_cache_seconds: float = Field(
        default=1.0,
        ge=0,
        description="How long a snapshot lookup is reused for other subscribers (a reconnect "
        "storm costs one lookup per token); the newest sample the instance has read always "
        "replaces an older cached one.",
    )
    ws_close_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        description="Longest wait for a closing handshake before the socket is aborted.",
    )
    ws_rate_limit_strikes: int = Field(
        default=10,
        ge=1,
        description="Consecutive messages over the rate limit (each answered rate_limited) "
        "before the connection is closed with 1008.",
    )
    ws_redis_timeout_seconds: float = Field(
        default=0.5, gt=0, description="Longest wait for one Redis round trip."
    )
    ws_db_timeout_seconds: float = Field(
        default=3.0, gt=0, description="Longest wait for PostgreSQL (connection and query)."
    )
    ws_db_pool_max_size: int = Field(default=5, ge=1, description="PostgreSQL connections.")
    ws_shutdown_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="On SIGTERM, how long clients get to answer the 1001 close frames.",
    )
    ws_access_log: bool = Field(default=False, description="Log one line per HTTP request.")
    ws_event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="Event loop of `tokvel run ws`: uvloop (libuv) cuts the cost of the "
        "per-connection sends and wake-ups that the fan-out is made of; asyncio is the "
        "standard library's.",
    )

    @field_validator("ws_instance_id")
    @classmethod
    def _instance_id_shape(cls, value: str) -> str:
        if INSTANCE_ID_PATTERN.match(value) is None:
            raise ValueError("WS_INSTANCE_ID must be 1-64 characters of [A-Za-z0-9._-]")
        return value

    @field_validator("ws_allowed_origins")
    @classmethod
    def _normalise_origins(cls, value: list[str]) -> list[str]:
        return [normalise_origin(origin) for origin in value]

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.api_default_tier not in self.ws_tiers:
            raise ValueError(
                f"WS_TIERS has no limits for API_DEFAULT_TIER {self.api_default_tier!r}"
            )
        if self.ws_resume_max_entries < self.ws_resume_buffer_size:
            raise ValueError("WS_RESUME_MAX_ENTRIES must be at least WS_RESUME_BUFFER_SIZE")
        if self.ws_instance_ttl_seconds <= self.ws_instance_heartbeat_seconds:
            raise ValueError("WS_INSTANCE_TTL_SECONDS must exceed WS_INSTANCE_HEARTBEAT_SECONDS")
        return self

    def ws_limits(self, tier: str) -> WsTierLimits:
        return self.ws_tiers.get(tier) or self.ws_tiers[self.api_default_tier]

    def origin_allowed(self, origin: str | None) -> bool:
        if origin is None:
            return True
        allowed = self.ws_allowed_origins
        return "*" in allowed or normalise_origin(origin) in allowed


def normalise_origin(origin: str) -> str:
    """Origins compare case-insensitively and without a trailing slash (RFC 6454)."""
    return origin.strip().rstrip("/").lower()
