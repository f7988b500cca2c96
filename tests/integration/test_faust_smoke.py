"""A real Faust worker against the real broker: consumes, keeps a changelogged table, produces."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tokvel_common.kafka import create_consumer, create_producer
from tokvel_common.settings import CommonSettings

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]


async def test_faust_worker_consumes_keeps_a_table_and_produces(
    settings: CommonSettings, tmp_path: Path
) -> None:
    prefix = f"faust-smoke-{uuid.uuid4().hex[:8]}-"
    bootstrap = settings.kafka_bootstrap_servers
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(f"{prefix}{t}", num_partitions=2, replication_factor=1)
                for t in ("words", "counts")
            ]
        )
    finally:
        await admin.close()

    producer = create_producer(bootstrap, client_id="faust-smoke")
    await producer.start()
    try:
        for i in range(30):
            await producer.send_and_wait(f"{prefix}words", key=f"k{i % 3}".encode(), value=b"w")
    finally:
        await producer.stop()

    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        "SMOKE_PREFIX": prefix,
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "SMOKE_DATADIR": str(tmp_path / "faust-data"),
    }
    with log_path.open("wb") as log:
        worker = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "faust", "-A", "tests.integration.faust_smoke_app",
            "worker", "--without-web", "-l", "info",
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    final: dict[bytes, int] = {}
    consumer = create_consumer(
        f"{prefix}counts", bootstrap_servers=bootstrap, group_id=None, client_id="faust-smoke"
    )
    await consumer.start()
    try:
        async with asyncio.timeout(90):
            while sum(final.values()) < 30 or len(final) < 3:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        assert record.key is not None and record.value is not None
                        final[record.key] = max(final.get(record.key, 0), int(record.value))
    finally:
        await consumer.stop()
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.wait(), 60)
    assert final == {b"k0": 10, b"k1": 10, b"k2": 10}, log_path.read_text()[-3000:]
    assert code == 0, log_path.read_text()[-3000:]
