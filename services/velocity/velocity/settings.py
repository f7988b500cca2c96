"""Settings of the velocity processor: every field is also an environment variable (upper case)."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from tokvel_common.settings import CommonSettings


class VelocitySettings(CommonSettings):
    velocity_store: str = Field(
        default="memory://",
        pattern=r"^(memory|rocksdb)://",
        description=(
            "Faust table store: memory:// (rebuilt from the changelog at start) or rocksdb:// "
            "(RocksDB via rocksdict under VELOCITY_DATA_DIR: restarts read only the changelog's "
            "tail)."
        ),
    )
    velocity_data_dir: Path = Field(
        default=Path(".run/velocity"),
        description="Where a worker keeps its local table data (RocksDB files).",
    )
    velocity_changelog_replicas: int = Field(
        default=1,
        ge=1,
        description="Replication factor of the state changelog topic Faust creates (3 in prod).",
    )
    velocity_expected_interval_seconds: int = Field(
        default=60,
        gt=0,
        description="Expected seconds between two quotes of a token (windows' points_expected).",
    )
    velocity_future_skew_seconds: float = Field(
        default=300.0,
        ge=0,
        description=(
            "A last_updated more than this ahead of its listing time (listed_at, else polled_at) "
            "is rejected as future_timestamp."
        ),
    )
    velocity_batch_size: int = Field(
        # On a backlog a batch is what arrived within VELOCITY_BATCH_WITHIN_SECONDS, up to this;
        # each token's state is written, and its newest sample published, once per batch.
        default=8000,
        ge=1,
        description="At most this many quotes are applied as one batch...",
    )
    velocity_batch_within_seconds: float = Field(
        default=0.25, gt=0, description="...or those that arrived within this many seconds..."
    )
    velocity_batch_idle_seconds: float = Field(
        # A live poll arrives as one burst: its batch is applied this long after the burst,
        # not VELOCITY_BATCH_WITHIN_SECONDS after its first quote (freshness).
        default=0.04,
        gt=0,
        description="...or as soon as no quote arrived for this many seconds.",
    )
    velocity_producer_linger_ms: int = Field(
        default=5, ge=0, description="Producer batching delay (ms) of samples and state writes."
    )
    velocity_session_timeout_seconds: float = Field(
        default=30.0,
        ge=6.0,  # the broker's default group.min.session.timeout.ms
        description="How long a dead worker keeps its partitions before the group moves them.",
    )
    velocity_heartbeat_interval_seconds: float = Field(
        default=3.0, gt=0, description="Consumer-group heartbeat (well below the session timeout)."
    )
    velocity_rebalance_timeout_seconds: float = Field(
        default=60.0, gt=0, description="How long the group waits for members to rejoin."
    )
    velocity_commit_interval_seconds: float = Field(
        default=2.8, gt=0, description="How often processed offsets are committed."
    )
    velocity_ops_host: str = Field(
        default="0.0.0.0",  # noqa: S104 - probes and Prometheus reach the pod from outside
        description="Address of /healthz, /readyz and /metrics.",
    )
    velocity_ops_port: int = Field(default=8093, ge=0, le=65535, description="Port of the same.")

    @model_validator(mode="after")
    def _heartbeat_below_session_timeout(self) -> Self:
        # The group coordinator requires a few heartbeats per session, or members are evicted.
        if self.velocity_heartbeat_interval_seconds * 3 > self.velocity_session_timeout_seconds:
            raise ValueError(
                "VELOCITY_HEARTBEAT_INTERVAL_SECONDS must be at most a third of "
                "VELOCITY_SESSION_TIMEOUT_SECONDS"
            )
        return self
