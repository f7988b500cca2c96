"""SQL-injection probes on every parameter change nothing.

Every path and query parameter of every operation in the gateway's ``/openapi.json``, the
headers the services read (and a few they do not), the broadcaster's ``api_key`` and the
fields of its messages each get the payloads below. Before and after: every table's row count
and a checksum of its rows (columns the API writes by design, usage bookkeeping, left out),
and the database's relations, functions and roles. Also: no answer is a 5xx, none leaks a
database error, none of the ``pg_sleep`` payloads slows an answer down, and a symbol lookup
with an always-true condition finds nothing.
"""

from __future__ import annotations

import time
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import asyncpg
import orjson
import pytest
from pydantic import SecretStr

from tests.abuse.conftest import Figures, Scale
from tests.abuse.stack import PEPPER, AbuseStack
from tests.abuse.support import format_ms, open_websocket
from tests.support.ws import eventually
from tokvel_common.apikeys import hash_key

pytestmark = pytest.mark.abuse

# The first few are the quick scale's; the full scale takes them all.
PAYLOADS: Final = (
    "' OR '1'='1",
    "1; DROP TABLE tokens;--",
    "' UNION SELECT key_hash, key_prefix FROM api_keys--",
    "'; UPDATE api_keys SET is_active = true;--",
    "1' AND pg_sleep(3) IS NULL--",
    "x'); DELETE FROM token_metrics;--",
    "'",
    "''",
    '"',
    "1'",
    "1 OR 1=1",
    "' OR 1=1--",
    '" OR ""="',
    "1) OR (1=1",
    "') OR ('a'='a",
    "admin'--",
    "1 UNION ALL SELECT NULL, NULL, NULL--",
    "1; SELECT pg_sleep(3)--",
    "'||pg_sleep(3)||'",
    "1 AND 1=(SELECT 1 FROM pg_sleep(3))",
    "$$; DROP TABLE api_keys; $$",
    "\\'; TRUNCATE tokens CASCADE;--",
    "'; INSERT INTO api_keys (key_hash, key_prefix, name) VALUES ('x', 'x', 'x');--",
    "'; COPY api_keys TO '/tmp/tokvel-keys';--",
    "'; CREATE TABLE pwned (x int);--",
    "'; CREATE ROLE pwned SUPERUSER;--",
    "1; ALTER TABLE tokens DROP COLUMN symbol;--",
    "%' OR '%'='",
    "*",
    "%",
    "_",
    "-1",
    "9223372036854775808",
    "1e309",
    "NaN",
    "1/0",
    "(SELECT 1)",
    "1::text",
    "tokens.cmc_id",
    "cmc_id desc; DROP TABLE tokens",
    "market_cap; DELETE FROM api_keys",
)
HEADERS: Final = (
    "X-API-Key",
    "X-Request-Id",
    "User-Agent",
    "Origin",
    "Referer",
    "Accept",
    "Accept-Language",
    "Cookie",
    "X-Forwarded-For",
    "If-None-Match",
)
SLEEP_BOUND_SECONDS: Final = 2.0
# What the API writes by design: usage bookkeeping.
MUTABLE_COLUMNS: Final = {
    "api_keys": {"last_used_at", "updated_at"},
    "rate_limiting": {"usage_count", "last_used_at"},
}
DATABASE_ERROR_MARKERS: Final = (
    b"syntax error",
    b"sqlstate",
    b"asyncpg",
    b"postgres",
    b"psql",
    b"relation ",
    b"traceback",
)
QUOTA_ROW: Final = """
SELECT count(*) FROM rate_limiting r JOIN api_keys k ON k.id = r.api_key_id WHERE k.key_hash = $1
"""
TABLES: Final = """
SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1
"""
COLUMNS: Final = """
SELECT column_name FROM information_schema.columns
WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position
"""
OBJECTS: Final = """
SELECT (SELECT string_agg(c.relname || ':' || c.relkind::text, ',' ORDER BY c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'),
       (SELECT string_agg(p.proname, ',' ORDER BY p.proname)
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'public'),
       (SELECT string_agg(rolname || ':' || rolsuper::text, ',' ORDER BY rolname) FROM pg_roles)
"""


async def database_state(database_url: str) -> dict[str, Any]:
    """Each table's row count and rows' checksum (mutable columns left out), and the
    database's relations, functions and roles."""
    conn = await asyncpg.connect(database_url)
    try:
        state: dict[str, Any] = {"objects": tuple(await conn.fetch(OBJECTS))}
        for table in [row[0] for row in await conn.fetch(TABLES)]:
            columns = [
                row[0]
                for row in await conn.fetch(COLUMNS, table)
                if row[0] not in MUTABLE_COLUMNS.get(table, ())
            ]
            row_text = "(" + ", ".join(f'"{c}"' for c in columns) + ")::text"
            # Identifiers from the catalog, quoted: no input of the test goes into this text.
            state[table] = tuple(
                await conn.fetch(
                    f"SELECT count(*), md5(coalesce(string_agg({row_text}, '|' "
                    f"ORDER BY {row_text}), '')) FROM \"{table}\""
                )
            )
        return state
    finally:
        await conn.close()


def _probes(
    openapi: dict[str, Any], payloads: tuple[str, ...]
) -> list[tuple[str, str, dict[str, str]]]:
    """(what, path with query, extra headers) for every parameter of every operation."""
    probes: list[tuple[str, str, dict[str, str]]] = []
    for path, item in openapi["paths"].items():
        parameters = item["get"].get("parameters", [])
        path_params = [p["name"] for p in parameters if p["in"] == "path"]
        filled = path.replace("{cmc_id}", "1").replace("{symbol}", "BTC")
        for name in path_params:
            for payload in payloads:
                target = path.replace(f"{{{name}}}", quote(payload, safe="")).replace(
                    "{cmc_id}", "1"
                )
                probes.append((f"{path} {name}", target, {}))
        for parameter in (p for p in parameters if p["in"] == "query"):
            for payload in payloads:
                query = f"{parameter['name']}={quote(payload, safe='')}"
                probes.append((f"{path} ?{parameter['name']}", f"{filled}?{query}", {}))
    for header in HEADERS:
        for payload in payloads:
            probes.append((f"header {header}", "/v1/tokens/1", {header: payload}))
    return probes


@pytest.mark.timeout(900)
async def test_injection_probes_change_nothing(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    payloads = PAYLOADS[: scale.injection_payloads]
    key = await stack.new_key()
    async with aiohttp.ClientSession() as session:
        async with session.get(stack.gateway.base_url + "/openapi.json") as response:
            openapi = await response.json()
        probes = _probes(openapi, payloads)
        parameters = {what for what, _, _ in probes}
        await _quota_row_exists(stack, session, key)
        before = await database_state(stack.database_url)
        server_errors, leaks, symbol_hits = [], [], []
        slowest = 0.0
        for what, target, extra in probes:
            headers = {"X-API-Key": key, **extra}
            started = time.perf_counter()
            async with session.get(stack.gateway.base_url + target, headers=headers) as response:
                body = await response.read()
                status = response.status
            slowest = max(slowest, time.perf_counter() - started)
            if status >= 500:
                server_errors.append((what, target, status))
            if any(marker in body.lower() for marker in DATABASE_ERROR_MARKERS):
                leaks.append((what, target, body[:200]))
            if what.endswith(" symbol") and status == 200:
                symbol_hits.append(target)
    ws_refused, ws_errors = await _probe_websocket(stack, key, payloads)
    after = await database_state(stack.database_url)
    changed = sorted(name for name in before if before[name] != after.get(name))

    figures.add(
        f"SQL injection: {len(payloads)} payloads x {len(parameters)} parameters "
        f"({len(probes)} requests), WebSocket key and messages",
        f"{len(changed)} tables or objects changed, {len(server_errors)} 5xx, "
        f"{len(leaks)} error leaks, slowest {format_ms(slowest)}",
        f"0 changed, 0 5xx, 0 leaks, slowest <= {format_ms(SLEEP_BOUND_SECONDS)}",
        not changed and not server_errors and not leaks and slowest <= SLEEP_BOUND_SECONDS,
    )
    assert (
        before["token_metrics"][0]["count"] > 0 and before["api_keys"][0]["count"] > 0
    )  # the data is there
    assert not changed, changed
    assert not server_errors, server_errors[:10]
    assert not leaks, leaks[:5]
    assert not symbol_hits, symbol_hits
    assert slowest <= SLEEP_BOUND_SECONDS
    assert ws_refused == len(payloads)
    assert ws_errors == {"invalid_message", "unknown_op"}, ws_errors


async def _quota_row_exists(stack: AbuseStack, session: aiohttp.ClientSession, key: str) -> None:
    """One counted request, then wait for its monthly usage row: the probes only add to it
    (``usage_count`` is left out of the checksum) instead of creating it mid-test."""
    url = stack.gateway.base_url + "/v1/tokens/1"
    async with session.get(url, headers={"X-API-Key": key}) as response:
        assert response.status == 200

    async def exists() -> bool:
        conn = await asyncpg.connect(stack.database_url)
        try:
            return bool(await conn.fetchval(QUOTA_ROW, hash_key(key, SecretStr(PEPPER))))
        finally:
            await conn.close()

    await eventually(exists, within=30.0, every=0.2)


async def _probe_websocket(
    stack: AbuseStack, key: str, payloads: tuple[str, ...]
) -> tuple[int, set[str]]:
    """The payloads as the ``api_key`` (each connection closed 4001) and inside subscribe
    messages (token ids, resume positions): the error codes answered."""
    refused = 0
    for payload in payloads:
        status, ws = await open_websocket(f"{stack.ws_url}?api_key={quote(payload, safe='')}", None)
        refused += status == 101 and await ws.receive_close_code() == 4001
        ws.abort()
    codes = set()
    status, ws = await open_websocket(stack.ws_url, key)
    assert status == 101
    try:
        for payload in payloads:
            for message in (
                {"op": "subscribe", "token_ids": [payload]},
                {"op": "subscribe", "token_ids": [1], "since_seq": {payload: 1}},
                {"op": payload},
            ):
                await ws.send_text(orjson.dumps(message))
                answer = orjson.loads(await ws.receive_text())
                codes.add(answer.get("code", answer["op"]))
    finally:
        ws.abort()
    return refused, codes
