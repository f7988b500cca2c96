"""kill -9 the writer process again and again during a replay of real samples.

Afterwards every unique (cmc_id, timestamp) of the replay is stored exactly once: offsets are
committed only after PostgreSQL commits, and redeliveries (the replay's own, and those a crash
causes) are skipped by the primary key. A final SIGTERM is a clean, zero-exit shutdown that
leaves nothing uncommitted.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import signal
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from tests.support.kafka import group_lag, produce
from tests.support.writer import environment, eventually, writer_settings
from tokvel_common.events import MetricsSample
from tokvel_common.settings import CommonSettings
from tokvel_common.topics import METRICS, TOKEN_INFO, prefixed
from writer.settings import WriterSettings

pytestmark = pytest.mark.integration

WRITER_COMMAND = (str(Path(sys.executable).with_name("tokvel")), "run", "writer")
KILLS = 5


async def _start_writer(settings: WriterSettings, log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log:
        return await asyncio.create_subprocess_exec(
            *WRITER_COMMAND,
            env={**os.environ, **environment(settings)},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )


def _with_redeliveries(
    samples: list[MetricsSample], rng: random.Random
) -> list[tuple[int, MetricsSample]]:
    """The replay with a tenth of its samples sent a second time, somewhat later."""
    messages = [(s.cmc_id, s) for s in samples]
    for sample in rng.sample(samples, len(samples) // 10):
        position = rng.randrange(len(messages) // 2, len(messages) + 1)
        messages.insert(position, (sample.cmc_id, sample))
    return messages


async def _rows(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM token_metrics")
    return count


async def test_kill_9_during_a_replay_neither_loses_nor_duplicates(
    test_settings: CommonSettings,
    replay_slice: list[MetricsSample],
    db: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    settings = writer_settings(
        test_settings, writer_batch_max_rows=200, writer_batch_max_seconds=0.1
    )
    rng = random.Random(15)
    messages = _with_redeliveries(replay_slice, rng)
    expected = {(s.cmc_id, s.ts) for s in replay_slice}
    assert len(messages) > len(expected)
    topic = prefixed(settings.topic_prefix, METRICS)
    # One part of the replay per writer, produced (throttled) while that writer runs, so every
    # crash lands while samples are still arriving; the last part only after the last crash. A
    # writer restarted after kill -9 waits for the group to drop its predecessor (the session
    # timeout): produced all at once, the replay could be stored before the later kills.
    size = len(messages) // (KILLS + 1)
    parts = [messages[i * size : (i + 1) * size] for i in range(KILLS)] + [messages[KILLS * size :]]
    seen = {(s.cmc_id, s.ts) for part in parts[:-1] for _, s in part}
    assert {(s.cmc_id, s.ts) for _, s in parts[-1]} - seen  # the last part has new samples

    rows_at_kills: list[int] = []
    orphans: list[int] = []  # the worker processes of the killed writers
    for cycle in range(KILLS):
        producing = asyncio.create_task(
            produce(
                settings.kafka_bootstrap_servers, topic, parts[cycle], chunk=50, pause_seconds=0.1
            )
        )
        process = await _start_writer(settings, tmp_path / f"writer-{cycle}.log")
        try:
            if cycle == 0:
                await asyncio.sleep(1.0)  # a crash during start-up, before any batch
            else:
                await eventually(
                    functools.partial(_above, db, await _rows(db)), what="the writer to progress"
                )
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # somewhere inside a batch
                orphans.extend(_children(process.pid))
        finally:
            process.kill()
            await process.wait()
        rows_at_kills.append(await _rows(db))
        await producing
    await produce(settings.kafka_bootstrap_servers, topic, parts[-1])
    assert orphans  # the writers had workers (WRITER_PREPARE_PROCESSES), and they left too:
    await eventually(lambda: _none_alive(orphans), what="the workers of killed writers to exit")

    process = await _start_writer(settings, tmp_path / "writer-final.log")
    try:
        await eventually(lambda: _equals(db, len(expected)), what="every sample stored", within=90)
    finally:
        process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.wait_for(process.wait(), 30)

    # Every crash struck mid-replay: rows were still missing when the process died.
    assert len(rows_at_kills) == KILLS and max(rows_at_kills) < len(expected), rows_at_kills
    assert exit_code == 0, (tmp_path / "writer-final.log").read_text()[-3000:]
    stored = await db.fetch(
        """SELECT t.cmc_id, m."timestamp", m.price_usd
           FROM token_metrics m JOIN tokens t ON t.id = m.token_id"""
    )
    assert len(stored) == len(expected)  # no duplicates (and the primary key forbids them)
    assert {(r["cmc_id"], r["timestamp"]) for r in stored} == expected  # no gaps
    prices = {(s.cmc_id, s.ts): s.price_usd for s in replay_slice}
    assert all(
        r["price_usd"] == Decimal(repr(prices[(r["cmc_id"], r["timestamp"])]))
        for r in stored
        if prices[(r["cmc_id"], r["timestamp"])] is not None
    )
    group = prefixed(settings.topic_prefix, settings.writer_group_id)
    topics = [topic, prefixed(settings.topic_prefix, TOKEN_INFO)]
    assert await group_lag(settings.kafka_bootstrap_servers, group, topics) == 0


def _state_and_parent(pid: int | str) -> list[str]:
    """[state, parent pid] of a process; empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``: the writer's workers, and the multiprocessing
    resource tracker (which leaves once they are gone)."""
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _state_and_parent(entry.name)[1:] == [str(pid)]
    ]


def _running(pid: int) -> bool:
    return _state_and_parent(pid)[:1] not in ([], ["Z"])


async def _none_alive(pids: list[int]) -> bool:
    return not any(_running(pid) for pid in pids)


async def _above(db: asyncpg.Connection, count: int) -> bool:
    return await _rows(db) > count


async def _equals(db: asyncpg.Connection, count: int) -> bool:
    return await _rows(db) == count
