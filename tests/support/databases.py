"""Per-test PostgreSQL databases on the shared server: created, cloned from a template, dropped.

Every name is unique per call, so concurrent test sessions on one machine never touch each
other's databases.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg


def with_database(dsn: str, database: str) -> str:
    """``dsn`` pointing at ``database`` instead."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{database}"))


async def create_database(admin_dsn: str, *, prefix: str, template: str | None = None) -> str:
    """A new database named ``prefix`` + a random suffix (a clone of ``template`` if given)."""
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"{clause}')
    finally:
        await conn.close()
    return name


async def drop_database(admin_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
