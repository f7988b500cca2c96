"""``tokvel keys``: the key is printed once (last line), stored only as a peppered hash, and
revoke / rotate / set-tier reach a running gateway at once (announced over Redis)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from tests.integration.gateway.conftest import PEPPER, Api
from tokvel_common.apikeys import KEY_LENGTH, hash_key, is_well_formed

pytestmark = pytest.mark.integration

TOKVEL = Path(sys.executable).with_name("tokvel")


async def tokvel_keys(api: Api, *args: str) -> tuple[int, str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": api.database_url,
        "REDIS_URL": api.settings.redis_url.get_secret_value(),
        "API_KEY_PEPPER": PEPPER.get_secret_value(),
    }
    process = await asyncio.create_subprocess_exec(
        str(TOKVEL),
        "keys",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def until(check_status: int, api: Api, key: str, path: str = "/v1/tokens/1") -> float:
    """Seconds until ``path`` answers ``check_status`` (at most 5)."""
    started = time.monotonic()
    while True:
        response = await api.get(path, key=key)
        if response.status == check_status:
            return time.monotonic() - started
        assert time.monotonic() - started < 5, f"still {response.status} after 5 s"
        await asyncio.sleep(0.05)


async def test_create_prints_the_key_once_and_stores_its_hash(api: Api) -> None:
    code, out, _ = await tokvel_keys(api, "create", "--name", "ci robot", "--tier", "pro")
    assert code == 0
    key = out.rstrip("\n").splitlines()[-1]
    assert len(key) == KEY_LENGTH and is_well_formed(key)
    conn = await asyncpg.connect(api.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM api_keys WHERE key_prefix = $1", key[:12])
        dump = await conn.fetchval("SELECT string_agg(t::text, '|') FROM api_keys t")
    finally:
        await conn.close()
    assert row is not None
    assert row["key_hash"] == hash_key(key, PEPPER)
    assert row["tier"] == "pro" and row["name"] == "ci robot"
    assert key not in dump and key[12:] not in dump, "the key itself is never stored"
    response = await api.get("/v1/tokens/1", key=key)
    assert response.status == 200
    assert response.headers["X-RateLimit-Limit"] == "600"

    code, out, _ = await tokvel_keys(api, "list")
    assert code == 0 and key[:12] in out and key not in out


async def test_revoke_rotate_and_set_tier_take_effect_at_once(api: Api) -> None:
    code, out, _ = await tokvel_keys(api, "create", "--name", "rotating")
    key = out.splitlines()[-1]
    first = await api.get("/v1/tokens/1", key=key)
    assert first.status == 200 and first.headers["X-RateLimit-Limit"] == "60"
    await api.get("/v1/tokens/1", key=key)

    code, out, _ = await tokvel_keys(api, "set-tier", key[:12], "enterprise")
    assert code == 0, out
    response = await api.get("/v1/tokens/1", key=key)
    assert response.headers["X-RateLimit-Limit"] == "6000"
    assert response.headers["X-RateLimit-Remaining"] == "5999", "its counters were dropped"

    code, out, _ = await tokvel_keys(api, "rotate", key[:12])
    assert code == 0
    new_key = out.splitlines()[-1]
    assert new_key != key and is_well_formed(new_key)
    assert await until(401, api, key) < 5
    assert (await api.get("/v1/tokens/1", key=new_key)).status == 200

    conn = await asyncpg.connect(api.database_url)
    try:
        key_id = await conn.fetchval("SELECT id FROM api_keys WHERE key_prefix = $1", new_key[:12])
    finally:
        await conn.close()
    code, out, _ = await tokvel_keys(api, "revoke", str(key_id))
    assert code == 0
    assert await until(403, api, new_key) < 5
    body = await (await api.get("/v1/tokens/1", key=new_key)).json()
    assert body["error"]["code"] == "api_key_revoked"


async def test_mistakes_are_reported_with_exit_code_1(api: Api) -> None:
    code, _, err = await tokvel_keys(api, "create", "--name", "x", "--tier", "platinum")
    assert code == 1 and "unknown tier 'platinum'" in err
    code, _, err = await tokvel_keys(api, "revoke", "tvk_nosuchkey")
    assert code == 1 and "no key" in err
