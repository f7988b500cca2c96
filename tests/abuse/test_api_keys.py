"""Guessing and revoked API keys.

Random keys: strings of a key's shape (``tvk_`` and 39 base62 characters) and arbitrary
printable strings, each refused with 401, and, since the checksum is checked first, without a
database lookup (``gateway_api_key_lookups_total{source="database"}`` does not move). Keys with
a valid checksum that were never issued cost one lookup each: the price of an attacker who
knows the format, reported as measured. The broadcaster closes such connections with 4001.

Revocation: the announced path (commit, then ``announce_key_change``, as ``tokvel keys revoke``
does) and the path where the announcement is lost (only the commit: Redis down at that moment).
Either way the REST API answers 403 and new WebSocket connections are refused within the key
cache TTL (at most 5 s). Open WebSocket connections are closed on the announcement; without it,
by the broadcaster's re-check of its open connections' keys (every TTL, through the same key
cache): within the TTL plus one re-check interval.
"""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
import asyncpg
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from tests.abuse.conftest import Figures, Scale
from tests.abuse.stack import PEPPER, AbuseStack
from tests.abuse.support import OP_CLOSE, format_ms, open_websocket
from tokvel_common.apikeys import (
    KEY_LENGTH,
    KEY_PREFIX,
    REVOKE_KEY,
    ApiKeySettings,
    announce_key_change,
    generate_key,
    hash_key,
    is_well_formed,
)

pytestmark = pytest.mark.abuse

SEED: Final = 20170810
CONCURRENCY: Final = 32
BASE62: Final = string.digits + string.ascii_uppercase + string.ascii_lowercase
# Header-safe printable characters (no whitespace: aiohttp's client would strip or refuse it).
PRINTABLE: Final = "".join(c for c in string.printable if not c.isspace())
REVOCATION_BOUND_SECONDS: Final = 5.0
# The stack's services run with the default key cache TTL. Without the announcement an open
# socket's key may be answered from the cache for a TTL after the commit, then the next re-check
# (one TTL later at most) looks it up: 2 x TTL (4 s) plus the lookup and the close, within
# REVOCATION_BOUND_SECONDS as long as the TTL is the default.
KEY_CACHE_TTL_SECONDS: Final[float] = ApiKeySettings.model_fields[
    "api_key_cache_ttl_seconds"
].default
POLL_SECONDS: Final = 0.05


def random_keys(count: int, rng: random.Random) -> list[str]:
    """Nine in ten of a key's exact shape (their checksum fails, but for 1 in 62**6), the
    rest arbitrary printable strings of 1 to 100 characters."""
    keys: list[str] = []
    while len(keys) < count:
        if len(keys) % 10:
            body = "".join(rng.choices(BASE62, k=KEY_LENGTH - len(KEY_PREFIX)))
            candidate = KEY_PREFIX + body
            if is_well_formed(candidate):
                continue  # a valid checksum by chance: not what this set is about
        else:
            candidate = "".join(rng.choices(PRINTABLE, k=rng.randint(1, 100)))
        keys.append(candidate)
    return keys


async def _database_lookups(stack: AbuseStack, session: aiohttp.ClientSession) -> float:
    return await stack.gateway.metric(
        session, "gateway_api_key_lookups_total", source="database", outcome="ok"
    )


async def _rest_statuses(
    stack: AbuseStack, session: aiohttp.ClientSession, keys: list[str]
) -> tuple[list[tuple[int, str]], float]:
    """(status, error code) for each key on GET /v1/tokens/1, CONCURRENCY at a time; seconds."""
    admitted = asyncio.Semaphore(CONCURRENCY)
    url = stack.gateway.base_url + "/v1/tokens/1"

    async def one(key: str) -> tuple[int, str]:
        async with admitted, session.get(url, headers={"X-API-Key": key}) as response:
            body = await response.json(content_type=None)
            return response.status, body.get("error", {}).get("code", "")

    started = time.perf_counter()
    results = await asyncio.gather(*(one(key) for key in keys))
    return list(results), time.perf_counter() - started


@pytest.mark.timeout(600)
async def test_random_keys_are_refused_without_database_lookups(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    rng = random.Random(SEED)
    guesses = random_keys(scale.random_keys, rng)
    minted = [generate_key() for _ in range(scale.random_keys // 10)]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)) as s:
        before = await _database_lookups(stack, s)
        results, seconds = await _rest_statuses(stack, s, guesses)
        after_guesses = await _database_lookups(stack, s)
        minted_results, _ = await _rest_statuses(stack, s, minted)
        after_minted = await _database_lookups(stack, s)
    refused = sum(status == 401 for status, _ in results)
    lookups = after_guesses - before
    figures.add(
        f"gateway: {len(guesses)} random keys",
        f"{refused} x 401 in {seconds:.1f} s ({len(guesses) / seconds:.0f}/s), "
        f"{lookups:.0f} database lookups",
        "all 401, 0 lookups",
        refused == len(guesses) and lookups == 0,
    )
    minted_refused = sum(status == 401 for status, _ in minted_results)
    minted_lookups = after_minted - after_guesses
    figures.add(
        f"gateway: {len(minted)} never-issued keys with a valid checksum",
        f"{minted_refused} x 401, {minted_lookups:.0f} database lookups (one each)",
        f"all 401, <= {len(minted)} lookups",
        minted_refused == len(minted) and minted_lookups <= len(minted),
    )
    assert refused == len(guesses), [r for r in results if r[0] != 401][:10]
    assert {code for _, code in results} <= {"invalid_api_key", "missing_api_key"}
    assert lookups == 0
    assert minted_refused == len(minted)
    assert minted_lookups <= len(minted)

    ws_guesses = guesses[: max(10, len(guesses) // 10)]
    codes = []
    for key in ws_guesses:
        status, ws = await open_websocket(stack.ws_url, key)
        codes.append(await ws.receive_close_code() if status == 101 else status)
        ws.abort()
    figures.add(
        f"broadcaster: {len(ws_guesses)} random keys",
        f"{codes.count(4001)} closed 4001",
        "all 4001",
        codes.count(4001) == len(ws_guesses),
    )
    assert codes.count(4001) == len(ws_guesses), codes


async def _until(check: Callable[[], Awaitable[bool]], since: float) -> float | None:
    """Seconds from ``since`` until ``check`` first holds (polled); None if it did not within
    three times the bound."""
    deadline = since + 3 * REVOCATION_BOUND_SECONDS
    while time.monotonic() < deadline:
        if await check():
            return time.monotonic() - since
        await asyncio.sleep(POLL_SECONDS)
    return None


def _within(seconds: float | None) -> bool:
    return seconds is not None and seconds <= REVOCATION_BOUND_SECONDS


def _describe(seconds: float | None) -> str:
    return format_ms(seconds) if seconds is not None else "never"


async def _revocation_times(
    stack: AbuseStack, *, announce: bool
) -> tuple[float | None, float | None, float | None]:
    """Seconds from the commit until REST says 403, until a new WebSocket is refused 4001,
    and until an open one is closed 4001 (None if it was still open after the bound)."""
    key = await stack.new_key()
    key_hash = hash_key(key, SecretStr(PEPPER))
    async with aiohttp.ClientSession() as session:
        url = stack.gateway.base_url + "/v1/tokens/1"
        headers = {"X-API-Key": key}
        async with session.get(url, headers=headers) as response:
            assert response.status == 200
        status, open_ws = await open_websocket(stack.ws_url, key)
        assert status == 101
        await open_ws.send_text(b'{"op": "subscribe", "token_ids": [1]}')
        await open_ws.receive_text()

        async def rest_refuses() -> bool:
            async with session.get(url, headers=headers) as response:
                return response.status == 403

        async def ws_refuses() -> bool:
            _, ws = await open_websocket(stack.ws_url, key)
            try:
                # Admitted: the ping is answered; refused: the first frame is the close.
                await ws.send_text(b'{"op": "ping"}')
                opcode, payload = await ws.receive_frame()
                return opcode == OP_CLOSE and ws.close_code(payload) == 4001
            finally:
                ws.abort()

        conn = await asyncpg.connect(stack.database_url)
        try:
            key_id = await conn.fetchval("SELECT id FROM api_keys WHERE key_hash = $1", key_hash)
            await conn.execute(REVOKE_KEY, key_id)
        finally:
            await conn.close()
        committed = time.monotonic()
        if announce:
            redis = Redis.from_url(stack.redis_url)
            try:
                await announce_key_change(redis, key_hash, "revoked")
            finally:
                await redis.aclose()
        closing = asyncio.create_task(
            open_ws.receive_close_code(within=3 * REVOCATION_BOUND_SECONDS)
        )
        rest, ws_new = await asyncio.gather(
            _until(rest_refuses, committed), _until(ws_refuses, committed)
        )
        try:
            code = await closing
        except TimeoutError:
            code = None  # still open
        ws_open = time.monotonic() - committed if code == 4001 else None
        open_ws.abort()
    return rest, ws_new, ws_open


async def test_revoked_key_is_refused_everywhere_within_5_s(
    figures: Figures, stack: AbuseStack
) -> None:
    rest, ws_new, ws_open = await _revocation_times(stack, announce=True)
    figures.add(
        "revoked key (announced): REST 403, new WS 4001, open WS closed 4001",
        f"after {_describe(rest)}, {_describe(ws_new)}, {_describe(ws_open)}",
        f"each within {REVOCATION_BOUND_SECONDS:g} s",
        _within(rest) and _within(ws_new) and _within(ws_open),
    )
    assert _within(rest) and _within(ws_new) and _within(ws_open), (rest, ws_new, ws_open)


async def test_revoked_key_without_announcement_is_refused_within_the_ttl(
    figures: Figures, stack: AbuseStack
) -> None:
    rest, ws_new, ws_open = await _revocation_times(stack, announce=False)
    figures.add(
        "revoked key (announcement lost): REST 403, new WS 4001",
        f"after {_describe(rest)}, {_describe(ws_new)}",
        f"each within {REVOCATION_BOUND_SECONDS:g} s",
        _within(rest) and _within(ws_new),
    )
    figures.add(
        "revoked key (announcement lost): open WS closed 4001 by the key re-check",
        f"after {_describe(ws_open)}",
        f"within {REVOCATION_BOUND_SECONDS:g} s (TTL {KEY_CACHE_TTL_SECONDS:g} s "
        "+ one re-check interval, the TTL)",
        _within(ws_open),
    )
    assert _within(rest) and _within(ws_new) and _within(ws_open), (rest, ws_new, ws_open)
