"""Two broadcaster processes: each delivers every update to its own clients, with the same
seqs; a process killed with SIGKILL is swept from ws_subs by the other; SIGTERM closes clients
with 1001 "going away" and removes the instance's entries at once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from tests.support.ws import (
    eventually,
    make_sample,
    publish,
    receive_json,
    receive_until,
    running_instance,
)
from ws_broadcaster.settings import WsSettings

pytestmark = pytest.mark.integration

CLIENTS_PER_INSTANCE = 3
TOKENS = (1, 1027)
SAMPLES_PER_TOKEN = 10


async def _members(redis: Redis, key: str) -> set[str]:
    return {m.decode() if isinstance(m, bytes) else m for m in await redis.smembers(key)}


async def test_two_instances_kill_and_sigterm(
    make_settings: Callable[..., WsSettings], key: str, redis: Redis, tmp_path: Path
) -> None:
    a_settings, b_settings = make_settings(), make_settings()
    log = tmp_path / "instances.log"
    async with (
        running_instance(a_settings, log) as a,
        running_instance(b_settings, log) as b,
        aiohttp.ClientSession() as session,
    ):
        clients = {
            instance.settings.ws_instance_id: [
                await session.ws_connect(instance.url, headers={"X-API-Key": key})
                for _ in range(CLIENTS_PER_INSTANCE)
            ]
            for instance in (a, b)
        }
        every = [ws for group in clients.values() for ws in group]
        for ws in every:
            await ws.send_json({"op": "subscribe", "token_ids": list(TOKENS)})
            await receive_until(ws, lambda r: len(r) == 1 + len(TOKENS))  # subscribed, snapshots
        members = await _members(redis, "ws_subs:1")
        assert len(members) == 2 * CLIENTS_PER_INSTANCE
        for instance_id in clients:
            assert sum(m.startswith(instance_id + ":") for m in members) == CLIENTS_PER_INSTANCE

        samples = [make_sample(t, minute=m) for m in range(SAMPLES_PER_TOKEN) for t in TOKENS]
        await publish(a_settings, samples)
        expected = len(samples)
        seen = [
            [(m["token_id"], m["seq"], m["sample"]["ts"]) for m in received]
            for received in await asyncio.gather(
                *(receive_until(ws, lambda r: len(r) == expected) for ws in every)
            )
        ]
        # Every client of both instances got every update, with the same seqs.
        assert all(sorted(s) == sorted(seen[0]) for s in seen)
        assert len(set(seen[0])) == expected

        # SIGKILL: no goodbye. The survivor sweeps the dead one's entries after its TTL.
        a.process.kill()
        await a.process.wait()
        a_id, b_id = a_settings.ws_instance_id, b_settings.ws_instance_id

        async def swept() -> bool:
            subs = await _members(redis, "ws_subs:1") | await _members(redis, "ws_subs:1027")
            instances = await _members(redis, "ws_instances")
            return not any(m.startswith(a_id + ":") for m in subs) and a_id not in instances

        await eventually(swept, within=15.0)
        assert len(await _members(redis, "ws_subs:1")) == CLIENTS_PER_INSTANCE
        assert not await redis.exists(f"ws_instance_keys:{a_id}")
        conns = [k async for k in redis.scan_iter("ws_conns:*")]
        assert len(conns) == 1
        assert all(m.startswith(b_id + ":") for m in await _members(redis, conns[0].decode()))

        # The survivor's clients are unaffected.
        await publish(b_settings, [make_sample(1, minute=99)])
        for ws in clients[b_id]:
            update = await receive_json(ws)
            assert update["op"] == "update" and update["sample"]["ts"].startswith(
                "2024-01-01T01:39"
            )

        # SIGTERM: clients are told "going away"; entries and heartbeat go at once.
        b.process.terminate()
        for ws in clients[b_id]:
            message = await ws.receive(timeout=10)
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert (message.data, message.extra) == (1001, "going away")
        assert await asyncio.wait_for(b.process.wait(), 15) == 0
        assert await _members(redis, "ws_subs:1") == set()
        assert not await redis.exists(f"ws_instance:{b_id}")
        for ws in every:
            await ws.close()
