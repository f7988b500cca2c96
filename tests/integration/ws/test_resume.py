"""Resume: a client that reconnects with since_seq gets exactly the updates it missed from the
buffer, on another instance as well (seqs are Kafka coordinates), or a fresh snapshot when the
gap is older than the buffer: never a silent hole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from tests.support.ws import eventually, make_sample, publish, receive_json, receive_until, serve
from ws_broadcaster.settings import WsSettings

pytestmark = pytest.mark.integration

BUFFER = 5


async def test_resume_after_a_gap_on_another_instance(
    make_settings: Callable[..., WsSettings], key: str
) -> None:
    async with (
        serve(make_settings(ws_resume_buffer_size=BUFFER)) as a,
        serve(make_settings(ws_resume_buffer_size=BUFFER)) as b,
        aiohttp.ClientSession() as session,
    ):
        last: dict[int, int] = {}
        async with session.ws_connect(a.url, headers={"X-API-Key": key}) as ws:
            await ws.send_json({"op": "subscribe", "token_ids": [1, 2]})
            await receive_until(ws, lambda r: len(r) == 3)
            await publish(a.settings, [make_sample(t, minute=m) for m in range(3) for t in (1, 2)])
            for update in await receive_until(ws, lambda r: len(r) == 6):
                last[update["token_id"]] = update["seq"]
        # Offline: 3 updates of token 1 (within the buffer), 8 of token 2 (beyond it).
        missed = [make_sample(1, minute=m) for m in range(10, 13)]
        missed += [make_sample(2, minute=m) for m in range(10, 18)]
        await publish(a.settings, missed)
        await eventually(
            lambda: (
                b.broadcaster.buffer.newest(2) is not None
                and b.broadcaster.buffer.newest(2).ts.minute == 17
                and b.broadcaster.buffer.newest(1).ts.minute == 12
            )
        )

        async with session.ws_connect(b.url, headers={"X-API-Key": key}) as ws:
            since = {str(t): s for t, s in last.items()}
            await ws.send_json({"op": "subscribe", "token_ids": [1, 2], "since_seq": since})
            first = await receive_until(ws, lambda r: len(r) == 5)
            assert first[0]["op"] == "subscribed"
            assert first[0]["resumed"] == [1]
            replayed = [m for m in first[1:] if m["op"] == "update"]
            assert [m["token_id"] for m in replayed] == [1, 1, 1]
            assert [m["sample"]["ts"][11:16] for m in replayed] == ["00:10", "00:11", "00:12"]
            assert all(m["seq"] > last[1] for m in replayed)
            (snapshot,) = [m for m in first[1:] if m["op"] == "snapshot"]
            assert snapshot["token_id"] == 2
            assert snapshot["reason"] == "resume_gap"
            assert snapshot["sample"]["ts"][11:16] == "00:17"  # the newest, from the buffer
            assert snapshot["seq"] == b.broadcaster.buffer.last_seq(2)
            assert b.metric("ws_resumes_total", outcome="replayed") == 1
            assert b.metric("ws_resumes_total", outcome="gap") == 1

            # Then live, in order, after what was replayed.
            await publish(a.settings, [make_sample(1, minute=20), make_sample(2, minute=20)])
            live: list[Any] = await receive_until(ws, lambda r: len(r) == 2)
            seqs = {m["token_id"]: m["seq"] for m in live}
            assert seqs[1] > replayed[-1]["seq"]
            assert seqs[2] > snapshot["seq"]

        # Resuming from the newest seq: nothing to replay, nothing missing.
        async with session.ws_connect(a.url, headers={"X-API-Key": key}) as ws:
            await ws.send_json(
                {"op": "subscribe", "token_ids": [1], "since_seq": {"1": seqs[1]}, "id": 9}
            )
            assert await receive_json(ws) == {
                "op": "subscribed",
                "id": 9,
                "token_ids": [1],
                "resumed": [1],
            }
            await publish(a.settings, [make_sample(1, minute=21)])
            update = await receive_json(ws)
            assert update["op"] == "update" and update["sample"]["ts"][11:16] == "00:21"


async def test_since_seq_must_name_subscribed_tokens(
    make_settings: Callable[..., WsSettings], key: str
) -> None:
    async with (
        serve(make_settings()) as served,
        aiohttp.ClientSession() as session,
        session.ws_connect(served.url, headers={"X-API-Key": key}) as ws,
    ):
        await ws.send_json({"op": "subscribe", "token_ids": [1], "since_seq": {"2": 5}})
        error = await receive_json(ws)
        assert (error["op"], error["code"]) == ("error", "invalid_message")
