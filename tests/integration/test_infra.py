"""``tokvel infra``: the stack it runs answers on the settings ``tokvel infra env`` prints.

Runs against the live local stack (``make infra-up``); ``down`` and ``reset`` are not tested
here because every other test shares that stack.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from redis.asyncio import Redis

from tokvel_common.infra.layout import Layout
from tokvel_common.infra.stack import statuses
from tokvel_common.topics import DEAD_LETTERS, METRICS, METRICS_LATEST, RAW_QUOTES, TOPICS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("TOKVEL_TESTCONTAINERS") == "1",
        reason="checks the stack `tokvel infra up` runs, not testcontainers",
    ),
]

TOKVEL = Path(sys.executable).with_name("tokvel")
ENV_NAMES = ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL", "REDIS_URL")
TOKVEL_TOPICS = (RAW_QUOTES, DEAD_LETTERS, METRICS, METRICS_LATEST)


def tokvel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOKVEL), *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def infra_env() -> dict[str, str]:
    done = tokvel("infra", "env")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, lines
    pairs = [line.split("=", 1) for line in lines]
    assert [name for name, _ in pairs] == list(ENV_NAMES)
    return {name: value for name, value in pairs}


def test_env_output_can_be_sourced_by_a_shell(infra_env: dict[str, str]) -> None:
    script = 'eval "$("$0" infra env)"; printf "%s\\n" "$KAFKA_BOOTSTRAP_SERVERS" "$DATABASE_URL"'
    script += ' "$REDIS_URL"'
    done = subprocess.run(
        ["bash", "-c", script, str(TOKVEL)], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == [infra_env[name] for name in ENV_NAMES]


@pytest.fixture
async def kafka_admin(infra_env: dict[str, str]) -> AsyncIterator[Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=infra_env["KAFKA_BOOTSTRAP_SERVERS"])
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def test_kafka_has_the_tokvel_topics_with_six_partitions(kafka_admin: Any) -> None:
    assert set(TOKVEL_TOPICS) <= set(await kafka_admin.list_topics())
    described = await kafka_admin.describe_topics([spec.name for spec in TOPICS])
    by_name = {topic["topic"]: topic for topic in described}
    for spec in TOPICS:
        topic = by_name[spec.name]
        assert topic["error_code"] == 0, topic
        assert len(topic["partitions"]) == spec.partitions == 6
        assert all(partition["leader"] >= 0 for partition in topic["partitions"])


async def test_latest_metrics_topic_is_compacted(kafka_admin: Any) -> None:
    resource = ConfigResource(ConfigResourceType.TOPIC, METRICS_LATEST, {"cleanup.policy": None})
    [response] = await kafka_admin.describe_configs([resource])
    [described] = response.to_object()["resources"]
    assert described["error_code"] == 0, described
    values = {e["config_names"]: e["config_value"] for e in described["config_entries"]}
    assert values["cleanup.policy"] == "compact"


async def test_postgres_answers_as_tokvel(infra_env: dict[str, str]) -> None:
    conn = await asyncpg.connect(infra_env["DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_user") == "tokvel"
        assert await conn.fetchval("SELECT current_database()") == "tokvel"
        assert int(await conn.fetchval("SHOW server_version_num")) // 10000 == 15
    finally:
        await conn.close()


async def test_redis_answers_with_append_only_persistence(infra_env: dict[str, str]) -> None:
    client = Redis.from_url(infra_env["REDIS_URL"], decode_responses=True)
    try:
        assert await client.ping() is True
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
        assert await client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert await client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
    finally:
        await client.aclose()


def test_second_up_is_harmless() -> None:
    layout = Layout.from_environment()
    before = {item.name: item.pid for item in statuses(layout)}
    assert None not in before.values(), f"stack not fully up: {before}"
    done = tokvel("infra", "up")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("already running") == 3, done.stdout
    assert {item.name: item.pid for item in statuses(layout)} == before
