"""Typed settings shared by every service.

Each service subclasses :class:`CommonSettings`, adds its own fields, and parses it once in
``main()``; the object is then passed down (no singletons). Every field is an environment
variable of the same name in upper case; defaults point at the local stack on loopback that
``make infra-up`` starts (ports from :mod:`tokvel_common.localstack`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokvel_common import localstack
from tokvel_common.paths import DEFAULT_REPLAY_DATA

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    kafka_bootstrap_servers: str = Field(
        default=f"127.0.0.1:{localstack.KAFKA_PORT}",
        description="Comma-separated Kafka bootstrap servers.",
    )
    database_url: SecretStr = Field(
        default=SecretStr(localstack.DATABASE_URL),
        description="PostgreSQL DSN (postgresql://user:password@host:port/db).",
    )
    redis_url: SecretStr = Field(
        default=SecretStr(localstack.REDIS_URL),
        description="Redis URL; with REDIS_CLUSTER=true, any node of the cluster.",
    )
    redis_cluster: bool = Field(default=False, description="Talk to a Redis Cluster.")
    cmc_base_url: str = Field(
        default=f"http://127.0.0.1:{localstack.CMC_REPLAY_PORT}",
        description="CMC Pro API base URL (the replay server locally).",
    )
    cmc_api_key: SecretStr = Field(
        default=SecretStr(localstack.CMC_REPLAY_API_KEY),
        description="CMC Pro API key, sent as X-CMC_PRO_API_KEY.",
    )
    poll_interval_seconds: float = Field(default=60.0, gt=0, description="CMC poll interval.")
    tokvel_replay_data: Path = Field(
        default=DEFAULT_REPLAY_DATA,
        description="Recorded CMC data the replay server, tests and demo read.",
    )
    topic_prefix: str = Field(
        default="", description="Prefix for every Kafka topic name (test isolation)."
    )
    log_level: LogLevel = "INFO"


def settings_epilog(settings_class: type[CommonSettings]) -> str:
    """The environment variables a command reads, for its ``--help``."""
    lines = ["settings (environment variables):"]
    for name, field in settings_class.model_fields.items():
        lines.append(f"  {name.upper():36} {field.description or ''}")
    return "\n".join(lines)
