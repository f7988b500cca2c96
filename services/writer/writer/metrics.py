"""The writer's Prometheus metrics, registered on the registry ``/metrics`` serves.

One object per running writer (tests run several in one process, each with its own registry).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WriterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        # PostgreSQL
        self.rows_written = counter(
            "tokvel_writer_rows_written_total", "token_metrics rows inserted"
        )
        self.conflicts_skipped = counter(
            "tokvel_writer_conflicts_skipped_total",
            "samples already stored (redeliveries), skipped by ON CONFLICT DO NOTHING",
        )
        self.batch_size = Histogram(
            "tokvel_writer_batch_size",
            "messages per written batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
            registry=registry,
        )
        self.batch_latency = Histogram(
            "tokvel_writer_batch_latency_seconds",
            "time to make a batch durable: partitions, COPY, inserts, commit",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.batch_failures = counter(
            "tokvel_writer_batch_failures_total",
            "attempts to write a batch that failed (consumption pauses and retries)",
            ("error",),
        )
        self.postgres_up = gauge(
            "tokvel_writer_postgres_up", "1 when the last batch write succeeded"
        )
        self.tokens_created = counter(
            "tokvel_writer_tokens_created_total", "tokens rows created on first sight"
        )
        self.metadata_updates = counter(
            "tokvel_writer_metadata_updates_total", "tokens rows changed by info messages"
        )
        self.samples_expired = counter(
            "tokvel_writer_samples_expired_total",
            "samples older than the retention (event time), not written",
        )
        self.newest_event_time = gauge(
            "tokvel_writer_newest_event_timestamp_seconds",
            "newest event time written (unix seconds); time() minus it is the event-time lag",
        )
        self.partitions_created = counter(
            "tokvel_writer_partitions_created_total", "daily partitions created"
        )
        self.partitions_dropped = counter(
            "tokvel_writer_partitions_dropped_total", "daily partitions dropped by retention"
        )
        # Kafka
        self.consumer_lag = gauge(
            "tokvel_writer_consumer_lag",
            "messages between the last one read and the partition's end",
            ("topic", "partition"),
        )
        self.messages_rejected = counter(
            "tokvel_writer_messages_rejected_total",
            "messages sent to the dead-letter topic",
            ("reason",),
        )
        self.commit_failures = counter(
            "tokvel_writer_commit_failures_total",
            "offset commits that failed after a durable batch (the batch is re-read, idempotently)",
        )
        # Redis
        self.redis_up = gauge(
            "tokvel_writer_redis_up", "1 when the last cache update reached Redis"
        )
        self.redis_errors = counter(
            "tokvel_writer_redis_errors_total", "failed Redis operations", ("operation",)
        )
        self.cache_keys_written = counter(
            "tokvel_writer_cache_keys_written_total", "token and velocity keys written"
        )
        self.cache_pending_tokens = gauge(
            "tokvel_writer_cache_pending_tokens",
            "tokens whose new state has not reached Redis yet (caught up when it returns)",
        )
        self.list_pages_dropped = counter(
            "tokvel_writer_list_pages_dropped_total", "cached list pages dropped on new data"
        )
        self.cache_warm_runs = counter(
            "tokvel_cache_warm_runs_total",
            "warm-ups of the top tokens, by reason (start, restart, flush)",
            ("reason",),
        )
        self.cache_warmed_tokens = counter(
            "tokvel_cache_warmed_tokens_total", "tokens written by warm-ups"
        )
        self.cache_popular_checks = counter(
            "tokvel_cache_popular_checks_total",
            "popular tokens checked ahead of expiry: hit = key still cached, miss = expired",
            ("result",),
        )
        self.cache_popular_refreshed = counter(
            "tokvel_cache_popular_refreshed_total", "popular tokens refreshed before expiry"
        )
        self.redis_keyspace_hits = gauge(
            "tokvel_redis_keyspace_hits", "Redis INFO keyspace_hits, summed over primaries"
        )
        self.redis_keyspace_misses = gauge(
            "tokvel_redis_keyspace_misses", "Redis INFO keyspace_misses, summed over primaries"
        )
