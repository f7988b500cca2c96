"""The writer's settings: every field is also an environment variable (upper case)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from tokvel_common.settings import CommonSettings


class WriterSettings(CommonSettings):
    writer_group_id: str = Field(
        default="tokvel-writer", description="Kafka consumer group of the writers."
    )
    writer_batch_max_rows: int = Field(
        default=10_000,
        gt=0,
        description="A batch is written when it holds this many messages...",
    )
    writer_batch_max_seconds: float = Field(
        default=1.0, gt=0, description="...or when its first message is this old."
    )
    writer_kafka_session_timeout_ms: int = Field(
        default=10_000,
        ge=6_000,  # the broker's default group.min.session.timeout.ms
        description="How long a dead writer keeps its partitions before the group moves them.",
    )
    writer_retry_max_seconds: float = Field(
        default=5.0, gt=0, description="Longest pause between retries while PostgreSQL is down."
    )
    writer_shutdown_timeout_seconds: float = Field(
        default=20.0, gt=0, description="On SIGTERM, how long the last flush may keep trying."
    )
    writer_redis_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        description="Redis socket timeout: cache updates are pipelines nobody waits on.",
    )
    writer_prepare_processes: int = Field(
        default=2,
        ge=0,
        description="Processes that decode batches and build their rows while the writer's own "
        "does the I/O, each a batch at a time (0: the writer's own does everything).",
    )
    writer_cache_min_interval_seconds: float = Field(
        default=0.5,
        ge=0,
        description="Least time between two cache updates: what the batches committed meanwhile "
        "is written to Redis at once.",
    )
    writer_retention_days: int = Field(
        default=90, gt=0, description="Days of token_metrics kept, counted in event time."
    )
    writer_partitions_ahead_days: int = Field(
        default=7, ge=1, description="Daily partitions created ahead of the newest day."
    )
    writer_maintenance_interval_seconds: float = Field(
        default=3600.0, gt=0, description="How often partitions are created and dropped."
    )
    writer_maintenance_lock_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        description="Longest wait of a partition drop for its lock (writes queue behind it).",
    )
    writer_warm_top_n: int = Field(
        default=100, ge=0, description="Tokens (by market cap) cached on start and on restart."
    )
    writer_warm_check_interval_seconds: float = Field(
        default=5.0, gt=0, description="How often a Redis restart or flush is looked for."
    )
    writer_popular_refresh_interval_seconds: float = Field(
        default=10.0, gt=0, description="How often popular tokens are checked for expiry."
    )
    writer_popular_refresh_ahead_seconds: float = Field(
        default=20.0,
        gt=0,
        description="A popular token whose key expires sooner than this is refreshed.",
    )
    writer_popular_min_hits: int = Field(
        default=3, ge=1, description="Reads in the last 5-10 minutes that make a token popular."
    )
    writer_popular_top_k: int = Field(
        default=50, ge=0, description="At most this many popular tokens refreshed per pass."
    )
    writer_ops_host: str = Field(
        default="127.0.0.1",
        description="Address of /healthz, /readyz and /metrics (0.0.0.0 in a container).",
    )
    writer_ops_port: int = Field(default=8092, ge=0, le=65535, description="Port of the same.")

    @model_validator(mode="after")
    def _look_ahead_covers_the_interval(self) -> Self:
        # Otherwise a popular key can expire between two passes without ever being seen due.
        if (
            self.writer_popular_refresh_ahead_seconds
            <= self.writer_popular_refresh_interval_seconds
        ):
            raise ValueError(
                "WRITER_POPULAR_REFRESH_AHEAD_SECONDS must exceed "
                "WRITER_POPULAR_REFRESH_INTERVAL_SECONDS"
            )
        return self
