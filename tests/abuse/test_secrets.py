"""No plaintext API key in a ``pg_dump`` of the database or in either service's log.

A key is used every way a client can send one: the REST ``X-API-Key`` header, the WebSocket
header and ``api_key`` query parameter (how browsers send it), a REST ``api_key`` parameter sent
by mistake; then it is rotated and revoked with ``tokvel keys``. Both services run with their
access logs on. The check looks for anything of a key's shape (``tvk_`` and 39 characters), so
it also covers every key the rest of the suite sent (random guesses included): this module runs
last (see ``conftest.py``).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from pydantic import SecretStr

from tests.abuse.conftest import Figures
from tests.abuse.stack import PEPPER, AbuseStack
from tests.abuse.support import open_websocket
from tokvel_common.apikeys import DISPLAY_PREFIX_LENGTH, hash_key
from tokvel_common.infra.system import PG_BIN

pytestmark = pytest.mark.abuse

KEY_SHAPE: Final = re.compile(rb"tvk_[0-9A-Za-z]{39}")


async def _use_everywhere(stack: AbuseStack, key: str) -> None:
    async with aiohttp.ClientSession() as session:
        url = stack.gateway.base_url + "/v1/tokens/1"
        async with session.get(url, headers={"X-API-Key": key}) as response:
            assert response.status == 200
        async with session.get(url, params={"api_key": key}) as response:
            assert response.status == 401
    for query in (False, True):
        url = f"{stack.ws_url}?api_key={key}" if query else stack.ws_url
        status, ws = await open_websocket(url, None if query else key)
        assert status == 101
        await ws.send_text(b'{"op": "subscribe", "token_ids": [1]}')
        assert b"subscribed" in await ws.receive_text()
        ws.abort()


async def _pg_dump(database_url: str, path: Path) -> bytes:
    process = await asyncio.create_subprocess_exec(
        str(PG_BIN / "pg_dump"),
        "--dbname",
        database_url,
        "--file",
        str(path),
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, errors.decode()
    return await asyncio.to_thread(path.read_bytes)


async def test_no_plaintext_key_in_a_database_dump_or_the_logs(
    stack: AbuseStack, figures: Figures, tmp_path: Path
) -> None:
    key = await stack.new_key(name="secrets-check")
    await _use_everywhere(stack, key)
    rotated = (await stack.tokvel_keys("rotate", key[:DISPLAY_PREFIX_LENGTH])).splitlines()[-1]
    stack.keys_issued.append(rotated)
    await _use_everywhere(stack, rotated)
    await stack.tokvel_keys("revoke", rotated[:DISPLAY_PREFIX_LENGTH])
    await asyncio.sleep(1.0)  # the broadcaster writes a WebSocket's access line when it ends

    dump = await _pg_dump(stack.database_url, tmp_path / "dump.sql")
    hashes = [hash_key(k, SecretStr(PEPPER)).encode() for k in stack.keys_issued]
    in_dump = KEY_SHAPE.findall(dump)
    hashed = sum(h in dump for h in hashes)
    logs = {s.name: s.log_path.read_bytes() for s in (stack.gateway, stack.ws)}
    in_logs = {name: KEY_SHAPE.findall(text) for name, text in logs.items()}
    lines = sum(text.count(b"\n") for text in logs.values())
    figures.add(
        f"pg_dump ({len(dump)} bytes, {hashed} of {len(hashes)} issued keys' hashes in it)",
        f"{len(in_dump)} plaintext keys",
        "0",
        not in_dump,
    )
    figures.add(
        f"service logs ({lines} lines, access logs on)",
        f"{sum(len(found) for found in in_logs.values())} plaintext keys",
        "0",
        not any(in_logs.values()),
    )
    # The dump does hold the key table: the hashes of the rotated key and every other kept key.
    assert hash_key(rotated, SecretStr(PEPPER)).encode() in dump
    assert not in_dump, in_dump[:5]
    assert not any(in_logs.values()), {name: found[:5] for name, found in in_logs.items()}
