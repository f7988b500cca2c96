"""asyncpg pool factory with tokvel's session settings."""

from __future__ import annotations

import asyncpg


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Every timestamp tokvel reads or writes is UTC; the session zone makes that explicit.
    await conn.execute("SET TIME ZONE 'UTC'")


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float = 10.0,
    application_name: str = "tokvel",
) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout,
        init=_init_connection,
        server_settings={"application_name": application_name},
    )
    return pool
