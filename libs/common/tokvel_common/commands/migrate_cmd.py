"""``tokvel migrate``: apply the SQL migrations to DATABASE_URL (idempotent)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import asyncpg

from tokvel_common.db.migrate import apply_migrations, load_migrations
from tokvel_common.logging import mask_dsn
from tokvel_common.settings import CommonSettings


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "migrate", help="apply the SQL migrations (a second run is a no-op)"
    )
    parser.add_argument("--database-url", help="overrides DATABASE_URL")
    parser.set_defaults(handler=_migrate)


async def _apply(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        applied = await apply_migrations(conn)
    finally:
        await conn.close()
    for migration in applied:
        sys.stdout.write(f"applied {migration.version:04d}_{migration.name}\n")
    total = len(load_migrations())
    sys.stdout.write(f"schema up to date: {total} migrations, {len(applied)} applied now\n")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    dsn = args.database_url or CommonSettings().database_url.get_secret_value()
    sys.stdout.write(f"migrating {mask_dsn(dsn)}\n")
    return asyncio.run(_apply(dsn))
