"""``tokvel keys``: create, list, revoke, rotate and re-tier API keys.

``create`` and ``rotate`` print the plaintext key once, as the last line (scripts take
``tail -n 1``); it is stored only as its peppered hash. Every change is committed to PostgreSQL
first, then announced on Redis (counters dropped, every gateway and broadcaster replica told);
if Redis is unavailable the replicas still pick the change up within API_KEY_CACHE_TTL_SECONDS.
A key is named by its id or its display prefix (``tvk_`` and 8 more characters).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import asyncpg
from redis.exceptions import RedisError

from api_gateway.quota import month_start
from tokvel_common.apikeys import (
    INSERT_KEY,
    REVOKE_KEY,
    ROTATE_KEY,
    SELECT_KEY_FOR_UPDATE,
    SELECT_KEYS,
    SET_KEY_TIER,
    ApiKeySettings,
    KeyAction,
    announce_key_change,
    display_prefix,
    generate_key,
    hash_key,
)
from tokvel_common.redis_client import create_redis

EXIT_OK = 0
EXIT_FAILED = 1


class KeyCommandError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "keys", help="API key administration (create, list, revoke, rotate, set-tier)"
    )
    parser.add_argument("--database-url", help="overrides DATABASE_URL")
    commands = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    create = commands.add_parser("create", help="create a key; prints it once, as the last line")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--tier", help="tier (default: API_DEFAULT_TIER)")

    listing = commands.add_parser("list", help="list keys with this month's usage")
    listing.add_argument("--all", action="store_true", help="include revoked keys")

    revoke = commands.add_parser("revoke", help="revoke a key (403 from then on)")
    revoke.add_argument("key", help="key id or display prefix")

    rotate = commands.add_parser(
        "rotate", help="replace a key's secret (the old one stops working); prints the new key"
    )
    rotate.add_argument("key", help="key id or display prefix")

    set_tier = commands.add_parser("set-tier", help="move a key to another tier")
    set_tier.add_argument("key", help="key id or display prefix")
    set_tier.add_argument("tier", help="the new tier")

    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    settings = ApiKeySettings()
    if settings.uses_dev_pepper:
        sys.stderr.write(
            "warning: API_KEY_PEPPER is the local development default; keys made with it "
            "only work where the same default is in use\n"
        )
    dsn = args.database_url or settings.database_url.get_secret_value()
    try:
        return asyncio.run(_run(args, settings, dsn, sys.stdout))
    except KeyCommandError as exc:
        sys.stderr.write(f"tokvel keys: {exc}\n")
        return EXIT_FAILED


async def _run(args: argparse.Namespace, settings: ApiKeySettings, dsn: str, out: TextIO) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        command: str = args.keys_command
        if command == "create":
            return await _create(conn, settings, args.name, args.tier, out)
        if command == "list":
            return await _list(conn, args.all, out)
        if command == "revoke":
            return await _revoke(conn, settings, args.key, out)
        if command == "rotate":
            return await _rotate(conn, settings, args.key, out)
        if command == "set-tier":
            return await _set_tier(conn, settings, args.key, args.tier, out)
        raise KeyCommandError(f"unknown action {command!r}")
    finally:
        await conn.close()


def _check_tier(settings: ApiKeySettings, tier: str) -> None:
    if tier not in settings.api_tiers:
        known = ", ".join(sorted(settings.api_tiers))
        raise KeyCommandError(f"unknown tier {tier!r} (configured: {known})")


async def _announce(settings: ApiKeySettings, key_hash: str, action: KeyAction) -> None:
    client = create_redis(settings.redis_url.get_secret_value(), cluster=settings.redis_cluster)
    try:
        await announce_key_change(client, key_hash, action)
    except (RedisError, OSError):
        sys.stderr.write(
            "warning: Redis unavailable, the change was not announced; every replica applies it "
            f"within {settings.api_key_cache_ttl_seconds:g} s all the same\n"
        )
    finally:
        await client.aclose()


async def _find(conn: asyncpg.Connection, ref: str) -> asyncpg.Record:
    """The key named by id or display prefix, locked until the transaction ends."""
    key_id = int(ref) if ref.isdigit() and len(ref) < 19 else -1
    rows = await conn.fetch(SELECT_KEY_FOR_UPDATE, key_id, ref)
    if not rows:
        raise KeyCommandError(f"no key {ref!r}")
    if len(rows) > 1:
        raise KeyCommandError(f"{ref!r} names several keys; use the id")
    row: asyncpg.Record = rows[0]
    return row


async def _create(
    conn: asyncpg.Connection, settings: ApiKeySettings, name: str, tier: str | None, out: TextIO
) -> int:
    tier = tier or settings.api_default_tier
    _check_tier(settings, tier)
    if not name.strip():
        raise KeyCommandError("the name must not be empty")
    key = generate_key()
    row = await conn.fetchrow(
        INSERT_KEY, hash_key(key, settings.api_key_pepper), display_prefix(key), name, tier
    )
    assert row is not None  # INSERT ... RETURNING always answers one row
    limits = settings.tier_limits(tier)
    out.write(
        f"created key {row['id']} ({row['key_prefix']}) name={name!r} tier={tier} "
        f"({limits.per_minute}/minute, {limits.per_month}/month)\n"
        "the key is shown once and cannot be recovered; store it now:\n"
        f"{key}\n"
    )
    return EXIT_OK


async def _list(conn: asyncpg.Connection, include_revoked: bool, out: TextIO) -> int:
    rows = await conn.fetch(SELECT_KEYS, month_start(datetime.now(UTC)), include_revoked)
    out.write(f"{'id':>6}  {'prefix':<12}  {'tier':<12}  {'state':<8}  {'month':>9}  name\n")
    for row in rows:
        state = "active" if row["is_active"] else "revoked"
        out.write(
            f"{row['id']:>6}  {row['key_prefix']:<12}  {row['tier']:<12}  {state:<8}  "
            f"{row['month_usage']:>9}  {row['name']}\n"
        )
    return EXIT_OK


async def _revoke(conn: asyncpg.Connection, settings: ApiKeySettings, ref: str, out: TextIO) -> int:
    async with conn.transaction():
        row = await _find(conn, ref)
        if not row["is_active"]:
            out.write(f"key {row['id']} ({row['key_prefix']}) was already revoked\n")
            return EXIT_OK
        await conn.execute(REVOKE_KEY, row["id"])
    await _announce(settings, row["key_hash"], "revoked")
    out.write(f"revoked key {row['id']} ({row['key_prefix']})\n")
    return EXIT_OK


async def _rotate(conn: asyncpg.Connection, settings: ApiKeySettings, ref: str, out: TextIO) -> int:
    key = generate_key()
    async with conn.transaction():
        row = await _find(conn, ref)
        if not row["is_active"]:
            raise KeyCommandError(f"key {row['id']} is revoked; create a new one")
        await conn.execute(
            ROTATE_KEY, row["id"], hash_key(key, settings.api_key_pepper), display_prefix(key)
        )
    await _announce(settings, row["key_hash"], "rotated")
    out.write(
        f"rotated key {row['id']} ({row['key_prefix']} -> {display_prefix(key)}); the old key "
        "no longer works. The new key is shown once:\n"
        f"{key}\n"
    )
    return EXIT_OK


async def _set_tier(
    conn: asyncpg.Connection, settings: ApiKeySettings, ref: str, tier: str, out: TextIO
) -> int:
    _check_tier(settings, tier)
    async with conn.transaction():
        row = await _find(conn, ref)
        await conn.execute(SET_KEY_TIER, row["id"], tier)
    await _announce(settings, row["key_hash"], "tier_changed")
    limits = settings.tier_limits(tier)
    out.write(
        f"key {row['id']} ({row['key_prefix']}) is now {tier} "
        f"({limits.per_minute}/minute, {limits.per_month}/month)\n"
    )
    return EXIT_OK
