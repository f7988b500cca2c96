"""Prometheus metrics of one broadcaster app (its own registry: tests run several per process)."""

from __future__ import annotations

from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

DropReason = Literal[
    "slow_consumer",  # send queue full: the client does not read (4008)
    "heartbeat_timeout",  # no pong within half the heartbeat interval
    "rate_limit",  # kept flooding after rate_limited errors (1008)
    "message_too_big",  # a client frame above WS_MAX_MESSAGE_BYTES (1009)
    "protocol_error",  # a frame aiohttp could not parse (1002/1007)
    "key_revoked",  # the key was revoked or rotated while connected (4001)
    "shutdown",  # the instance is stopping (1001)
]

LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class WsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections = Gauge(
            "ws_connections", "Open WebSocket connections on this instance.", registry=registry
        )
        self.subscriptions = Gauge(
            "ws_subscriptions",
            "Subscriptions (connection, token pairs) on this instance.",
            registry=registry,
        )
        self.subscribed_tokens = Gauge(
            "ws_subscribed_tokens",
            "Tokens with at least one subscriber on this instance.",
            registry=registry,
        )
        self.connects = Counter(
            "ws_connect_attempts",
            "WebSocket connection attempts by outcome (accepted, origin_rejected, unauthorized, "
            "key_connection_limit, auth_unavailable, not_websocket).",
            ["outcome"],
            registry=registry,
        )
        self.messages_sent = Counter(
            "ws_messages_sent",
            "Messages sent to clients, by kind (update, replay, snapshot, reply).",
            ["kind"],
            registry=registry,
        )
        self.drops = Counter(
            "ws_drops",
            "Connections closed by the server, by reason.",
            ["reason"],
            registry=registry,
        )
        self.client_errors = Counter(
            "ws_client_errors",
            "Client messages answered with an error, by code.",
            ["code"],
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "ws_delivery_latency_seconds",
            "From the production of a sample (its Kafka record timestamp) to its update being "
            "written to a client's socket.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.key_rechecks = Counter(
            "ws_key_rechecks",
            "Periodic re-verifications of the API keys of open connections, one per key, by "
            "outcome (valid; ended: revoked or rotated, its connections closed; unavailable: "
            "PostgreSQL could not say, its connections left open).",
            ["outcome"],
            registry=registry,
        )
        self.records = Counter(
            "ws_records",
            "token.metrics records read, by outcome (published, invalid).",
            ["outcome"],
            registry=registry,
        )
        self.resumes = Counter(
            "ws_resumes",
            "Tokens subscribed with since_seq, by outcome (replayed, gap).",
            ["outcome"],
            registry=registry,
        )
        self.snapshots = Counter(
            "ws_snapshot_lookups",
            "Snapshot lookups by source (redis, postgres, none, unavailable).",
            ["source"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "ws_redis_errors",
            "Redis calls that failed or timed out, by operation.",
            ["operation"],
            registry=registry,
        )
        self.swept_instances = Counter(
            "ws_swept_instances",
            "Dead instances whose ws_subs entries this instance removed.",
            registry=registry,
        )
        self.resume_buffer_entries = Gauge(
            "ws_resume_buffer_entries", "Updates held for resuming clients.", registry=registry
        )
