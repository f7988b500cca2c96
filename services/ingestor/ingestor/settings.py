"""Settings of the ingestor, the CMC replay server and backfill (every field is an env var)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field

from tokvel_common import localstack
from tokvel_common.settings import CommonSettings

ApiVersion = Literal["v3", "v1"]


def _default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class IngestorSettings(CommonSettings):
    cmc_api_version: ApiVersion = Field(
        default="v3",
        description="Listings endpoint: v3 (quote a list) or the deprecated v1 (quote a map).",
    )
    cmc_page_limit: int = Field(
        default=5000, ge=1, le=5000, description="`limit` of each listings page (CMC's max 5000)."
    )
    cmc_request_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Total time allowed for one CMC request."
    )
    cmc_max_attempts: int = Field(
        default=6, ge=1, description="Attempts per CMC request on 5xx, timeouts and 429 (minute)."
    )
    cmc_backoff_base_seconds: float = Field(
        default=1.0, gt=0, description="First retry waits up to this (exponential, full jitter)."
    )
    cmc_backoff_max_seconds: float = Field(default=30.0, gt=0, description="Cap of one retry wait.")
    cmc_rate_limit_window_seconds: float = Field(
        default=60.0,
        gt=0,
        description="CMC's rate-limit window: after 1008/1011 the next request waits for it.",
    )
    cmc_info_refresh_seconds: float = Field(
        default=86_400.0, gt=0, description="Age after which a token's /v2 metadata is refetched."
    )
    cmc_info_batch_size: int = Field(
        default=500, ge=1, le=5000, description="Ids per /v2/cryptocurrency/info request."
    )
    ingestor_ops_host: str = Field(
        default="127.0.0.1", description="Bind address of /healthz, /readyz, /metrics."
    )
    ingestor_ops_port: int = Field(
        default=8091, ge=0, le=65535, description="Port of the ops endpoints."
    )
    ingestor_instance_id: str = Field(
        default_factory=_default_instance_id, description="Owner name written into the lease."
    )
    ingestor_lease_ttl_seconds: float = Field(
        default=15.0,
        gt=0,
        description="Lease lifetime; a standby takes over at most ttl * 4/3 after the poller dies.",
    )
    ingestor_dedupe_lookback_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="Without dedupe state in Redis, how far back the topic is read to rebuild it.",
    )
    ingestor_delivery_retry_max_seconds: float = Field(
        default=10.0, gt=0, description="Cap of the wait between re-sends of undelivered quotes."
    )
    ingestor_linger_ms: int = Field(default=20, ge=0, description="Producer batching delay (ms).")


class ReplaySettings(CommonSettings):
    replay_host: str = Field(default="127.0.0.1", description="Bind address of the replay server.")
    replay_port: int = Field(
        default=localstack.CMC_REPLAY_PORT, ge=0, le=65535, description="Port of the replay server."
    )
    replay_snapshots: int | None = Field(
        default=None, ge=1, description="Serve only the first N recorded snapshots."
    )
    replay_faults: list[str] = Field(
        default_factory=list,
        description="Injected faults, e.g. ['minute_rate_limit:after=3', 'slow:delay=5'].",
    )


def settings_epilog(settings_class: type[CommonSettings]) -> str:
    """The environment variables a command reads, for its ``--help``."""
    lines = ["settings (environment variables):"]
    for name, field in settings_class.model_fields.items():
        lines.append(f"  {name.upper():36} {field.description or ''}")
    return "\n".join(lines)
