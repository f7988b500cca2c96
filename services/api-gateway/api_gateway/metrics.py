"""Prometheus metrics of one gateway app (its own registry, so several apps can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "gateway_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "gateway_http_request_duration_seconds",
            "Time to answer (streamed bodies: to the headers), by route.",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.cache = Counter(
            "gateway_cache_lookups",
            "Cache-aside lookups by kind (token, velocity, list) and result (hit, miss).",
            ["kind", "result"],
            registry=registry,
        )
        self.memory_hits = Counter(
            "gateway_memory_cache_hits",
            "Cache hits answered from process memory, without Redis, by kind (token, velocity).",
            ["kind"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "gateway_redis_errors",
            "Redis calls that failed or timed out, by operation.",
            ["operation"],
            registry=registry,
        )
        self.redis_up = Gauge(
            "gateway_redis_up", "1 when the last Redis call succeeded.", registry=registry
        )
        self.db_errors = Counter(
            "gateway_db_unavailable",
            "Requests that needed PostgreSQL and could not reach it.",
            registry=registry,
        )
        self.rate_limit = Counter(
            "gateway_rate_limit_decisions",
            "Rate-limit decisions by backend (redis, local) and result (allowed, minute, month).",
            ["backend", "result"],
            registry=registry,
        )
        self.key_lookups = Counter(
            "gateway_api_key_lookups",
            "API key resolutions by source (memory, database, stale) and outcome.",
            ["source", "outcome"],
            registry=registry,
        )
        self.key_changes = Counter(
            "gateway_api_key_changes",
            "Key change announcements received (each drops cached state of one key).",
            registry=registry,
        )
        self.quota_flushes = Counter(
            "gateway_quota_flushes",
            "Monthly usage flushes to PostgreSQL by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        self.quota_pending = Gauge(
            "gateway_quota_pending_requests",
            "Counted requests not yet added to the monthly usage in PostgreSQL.",
            registry=registry,
        )
        # Resolved label children, by labels: .labels() costs a lock and a lookup per call.
        self._children: dict[tuple[str, ...], Any] = {}

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, str(status))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = (
                self.requests.labels(*key),
                self.latency.labels(route),
            )
        child[0].inc()
        child[1].observe(seconds)

    def cache_lookup(self, kind: str, result: str) -> None:
        key = ("cache", kind, result)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.cache.labels(kind, result)
        child.inc()

    def memory_hit(self, kind: str) -> None:
        key = ("memory", kind)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.memory_hits.labels(kind)
        child.inc()

    def decision(self, backend: str, result: str) -> None:
        key = ("rate_limit", backend, result)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.rate_limit.labels(backend, result)
        child.inc()

    def key_lookup(self, source: str, outcome: str) -> None:
        key = ("key", source, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.key_lookups.labels(source, outcome)
        child.inc()
