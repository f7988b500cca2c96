"""Ingestors as real processes: one polls at a time and a standby takes over after a kill;
SIGTERM delivers everything already fetched before the process exits."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from tests.integration.ingestor.conftest import (
    assert_exactly_once,
    expected_keys,
    free_port,
    ingestor_settings,
    raw_topic,
    read_topic,
    recorded_snapshots,
    replay_server,
    running_ingestor,
    scrape,
    start_process,
)
from tokvel_common.settings import CommonSettings

pytestmark = pytest.mark.integration

INTERVAL = 3.0
LEASE_TTL = 1.5  # a standby takes over within ttl * 4/3 = 2 s: inside one interval


def _polls(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("ingestor_polls_total"))


async def test_one_ingestor_polls_and_a_standby_takes_over_after_a_kill(
    settings: CommonSettings,
    topic_prefix: str,
    redis_url: str,
    recording: Path,
    tmp_path: Path,
) -> None:
    snapshots = recorded_snapshots(recording, 4)
    async with replay_server(recording, snapshots=len(snapshots)) as server:
        ports = [free_port(), free_port()]
        processes = [
            await start_process(
                ingestor_settings(
                    settings, topic_prefix, redis_url, server.url,
                    poll_interval_seconds=INTERVAL, ingestor_lease_ttl_seconds=LEASE_TTL,
                    ingestor_ops_port=port, ingestor_instance_id=f"replica-{n}",
                ),
                tmp_path / f"replica-{n}.log",
            )
            for n, port in enumerate(ports)
        ]  # fmt: skip
        try:
            # Both up, the first sweep done, and then the state of each replica.
            await server.wait("a first sweep", lambda s: s["sweeps"] >= 1, within=30)
            await asyncio.sleep(0.5)  # the poll is delivered; the next is INTERVAL away
            metrics = [await scrape(server.session, port) for port in ports]
            held = [m["ingestor_lease_held"] for m in metrics]
            assert sorted(held) == [0.0, 1.0], held
            leader = held.index(1.0)
            standby = 1 - leader
            assert _polls(metrics[leader]) >= 1
            assert _polls(metrics[standby]) == 0  # a standby never asks CMC anything

            sweeps_before = (await server.state())["sweeps"]
            processes[leader].kill()
            killed_at = time.monotonic()
            await processes[leader].wait()
            await server.wait(
                "the standby polls", lambda s: s["sweeps"] > sweeps_before, within=INTERVAL * 2
            )
            takeover = time.monotonic() - killed_at
            assert takeover < INTERVAL, f"took over after {takeover:.1f} s"
            assert (await scrape(server.session, ports[standby]))["ingestor_lease_held"] == 1

            await server.wait("the replay is over", lambda s: s["exhausted"], within=30)
            await asyncio.sleep(0.5)
            processes[standby].send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(processes[standby].wait(), 30) == 0
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    quotes = await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix))
    assert_exactly_once(quotes, expected_keys(snapshots))


async def test_sigterm_delivers_what_was_fetched_and_a_restart_completes_the_sweep(
    settings: CommonSettings,
    topic_prefix: str,
    redis_url: str,
    recording: Path,
    tmp_path: Path,
) -> None:
    snapshot = recorded_snapshots(recording, 1)
    page = 50
    # Pages 1 and 2 come at once; page 3 hangs: SIGTERM arrives in the middle of the poll.
    async with replay_server(
        recording, snapshots=1, faults=("slow:delay=60,after=2,path=/v3",)
    ) as server:
        config = ingestor_settings(
            settings, topic_prefix, redis_url, server.url,
            cmc_page_limit=page, cmc_request_timeout_seconds=120, ingestor_ops_port=free_port(),
        )  # fmt: skip
        log = tmp_path / "ingestor.log"
        process = await start_process(config, log)
        try:
            await server.wait("page 3 is in flight", lambda s: s["requests"] >= 3, within=30)
            process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(process.wait(), 15)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert code == 0, log.read_text()
        assert "poll abandoned for shutdown" in log.read_text()
        topic = raw_topic(topic_prefix)
        fetched = {(r["cmc_id"]) for r in snapshot[0][: 2 * page]}
        assert sorted(q.id for q in await read_topic(settings.kafka_bootstrap_servers, topic)) == (
            sorted(fetched)
        )
        # The replay did not move on (no full sweep): a new run sweeps the same snapshot and
        # publishes only what is missing.
        async with server.session.delete(f"{server.url}/_replay/faults"):
            pass
        async with running_ingestor(config.model_copy(update={"ingestor_ops_port": 0})):
            await server.wait("a full sweep", lambda s: s["sweeps"] >= 1)
            await asyncio.sleep(0.3)
    assert_exactly_once(
        await read_topic(settings.kafka_bootstrap_servers, topic), expected_keys(snapshot)
    )
