"""Prometheus metrics of the velocity processor (served on /metrics)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from velocity.tables import StateTable


class StateSizeCollector(Collector):
    """Size of the state table held by this worker, read when scraped (not per message)."""

    def __init__(self, table: StateTable) -> None:
        self._table = table

    def collect(self) -> Iterator[GaugeMetricFamily]:
        tokens = 0
        size = 0
        for value in self._table.data.values():
            tokens += 1
            size += len(value)
        yield GaugeMetricFamily(
            "velocity_state_tokens", "Tokens in this worker's state (active and standby).", tokens
        )
        yield GaugeMetricFamily(
            "velocity_state_bytes", "Serialized size of this worker's token states.", size
        )


class VelocityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.consumed = Counter(
            "velocity_quotes_consumed", "Quotes read from cmc.quotes.raw.", registry=registry
        )
        self.emitted = Counter(
            "velocity_samples_emitted",
            "Enriched samples published to token.metrics.",
            registry=registry,
        )
        self.rejected = Counter(
            "velocity_quotes_rejected",
            "Quotes sent to cmc.quotes.dlq, by reason.",
            ["reason"],
            registry=registry,
        )
        self.duplicates = Counter(
            "velocity_quotes_duplicate",
            "Quotes ignored because their (cmc_id, last_updated) was already counted.",
            registry=registry,
        )
        self.redelivered = Counter(
            "velocity_quotes_redelivered",
            "Input delivered again after a restart or rebalance and already in the state.",
            registry=registry,
        )
        self.publish_retries = Counter(
            "velocity_publish_retries",
            "Batches whose samples or state had to be sent again after a delivery failure.",
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "velocity_batch_seconds",
            "Time to apply one batch and get its samples and state acknowledged.",
            registry=registry,
        )
        self.lag_messages = Gauge(
            "velocity_consumer_lag_messages",
            "Messages of cmc.quotes.raw not processed yet, by partition (at the last batch).",
            ["partition"],
            registry=registry,
        )
        self.lag_seconds = Gauge(
            "velocity_processing_lag_seconds",
            "Wall-clock time from polled_at to processing, of the last quote processed.",
            registry=registry,
        )
