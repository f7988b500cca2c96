"""aiokafka client factories with tokvel's delivery guarantees in one place."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer


def create_producer(
    bootstrap_servers: str, *, client_id: str, linger_ms: int = 5
) -> AIOKafkaProducer:
    """Idempotent producer, ``acks=all``: a retried send is never written twice."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers,
        client_id=client_id,
        acks="all",
        enable_idempotence=True,
        compression_type="lz4",
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        request_timeout_ms=30_000,
    )


def create_consumer(
    *topics: str,
    bootstrap_servers: str,
    group_id: str | None,
    client_id: str,
    auto_offset_reset: str = "earliest",
    session_timeout_ms: int = 10_000,
) -> AIOKafkaConsumer:
    """Consumer with manual commits: offsets move only after the work they cover is durable.

    ``session_timeout_ms`` is how long a dead member keeps its partitions before the group
    rebalances them to the survivors.
    """
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap_servers,
        group_id=group_id,
        client_id=client_id,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        isolation_level="read_committed",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=session_timeout_ms // 3,
    )
