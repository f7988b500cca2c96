"""Kafka topic names and their configuration (ARCHITECTURE.md -> Kafka topics)."""

from __future__ import annotations

from dataclasses import dataclass, field

RAW_QUOTES = "cmc.quotes.raw"
DEAD_LETTERS = "cmc.quotes.dlq"
METRICS = "token.metrics"
METRICS_LATEST = "token.metrics.latest"
# Token metadata from CMC's /v2/cryptocurrency/info, refreshed daily by the ingestor, persisted
# into `tokens` by the writer; compacted so a new writer finds the latest of every token.
TOKEN_INFO = "cmc.tokens.info"  # noqa: S105 - a topic name, not a credential


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str] = field(default_factory=dict)


# Six partitions: enough for the velocity workers and writers to scale out on the 2-core
# machines here and a few more in production, few enough to keep a single broker light.
DEFAULT_PARTITIONS = 6

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(RAW_QUOTES, DEFAULT_PARTITIONS, {"retention.ms": str(14 * 24 * 3600 * 1000)}),
    TopicSpec(DEAD_LETTERS, DEFAULT_PARTITIONS, {"retention.ms": str(30 * 24 * 3600 * 1000)}),
    TopicSpec(METRICS, DEFAULT_PARTITIONS, {"retention.ms": str(14 * 24 * 3600 * 1000)}),
    TopicSpec(
        METRICS_LATEST,
        DEFAULT_PARTITIONS,
        {"cleanup.policy": "compact", "min.compaction.lag.ms": "0", "segment.ms": "3600000"},
    ),
    TopicSpec(TOKEN_INFO, DEFAULT_PARTITIONS, {"cleanup.policy": "compact"}),
)


def prefixed(prefix: str, name: str) -> str:
    """A topic name under a prefix (tests isolate themselves with a unique one)."""
    return f"{prefix}{name}"
