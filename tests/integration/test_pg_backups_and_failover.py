"""WAL archiving, backups and verify with pgBackRest; promotion by the watchdog.

Each test runs its own PostgreSQL cluster (one node, or a primary and a standby) in a scratch
dir on free ports, through the same functions ``tokvel infra up`` uses; the shared stack is not
touched. The full drills (``make backup-drill``, ``make failover-drill``) are too long for CI.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokvel_common.infra import pgbackrest
from tokvel_common.infra.pg_cluster import (
    PgCluster,
    ensure_replica,
    replication_state,
    settings_for,
)
from tokvel_common.infra.pg_watchdog import Watchdog, WatchdogSettings
from tokvel_common.infra.pgbackrest import BackupSettings
from tokvel_common.infra.postgres import (
    PgPaths,
    connect,
    ensure_database,
    in_recovery,
    initdb,
    kill,
    running_pid,
    start,
    stop,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _two_free_ports() -> int:
    """A port p such that p and p + 1 are free (the standby takes the next one)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A dir the PostgreSQL user can traverse (pytest's tmp_path sits under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="tokvel-pg-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _stop_all(cluster: PgCluster) -> None:
    for node in (cluster.first, cluster.second):
        if running_pid(node) is not None:
            stop(node)


def _new_cluster(scratch: Path, *, backups: bool, standby: bool) -> PgCluster:
    first = PgPaths(scratch / "postgres", None, port=_two_free_ports())
    cluster = PgCluster(first, scratch, backups=backups, standby=standby)
    initdb(first)
    start(first, settings_for(cluster, first, follow=None, sync=False))
    asyncio.run(ensure_database(first))
    return cluster


async def _execute(node: PgPaths, *statements: str) -> None:
    conn = await connect(node)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def _fetchval(node: PgPaths, query: str) -> object:
    conn = await connect(node)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def test_wal_is_archived_into_both_repositories_and_backups_verify(scratch: Path) -> None:
    cluster = _new_cluster(scratch, backups=True, standby=False)
    paths = cluster.backrest
    try:
        pgbackrest.prepare(paths, cluster.nodes, BackupSettings())
        pgbackrest.stanza_create(paths)
        asyncio.run(
            _execute(
                cluster.first,
                "CREATE TABLE kept (id int PRIMARY KEY)",
                "INSERT INTO kept SELECT generate_series(1, 1000)",
            )
        )
        # `check` switches to a new WAL segment and waits until both repositories have it.
        checked = pgbackrest.check(paths)
        assert "successfully archived" in checked and "on repo2" in checked
        for repo in pgbackrest.REPOS:
            pgbackrest.backup(paths, "full", repo)
        asyncio.run(_execute(cluster.first, "INSERT INTO kept SELECT generate_series(1001, 1100)"))
        pgbackrest.backup(paths, "incr", 2)

        backups = pgbackrest.backups(paths)
        assert [(b.repo, b.kind) for b in backups] == [(1, "full"), (2, "full"), (2, "incr")]
        assert backups[2].prior == backups[1].label
        verified = pgbackrest.verify(paths)
        assert "verify command end: completed successfully" in verified
        for repo in pgbackrest.REPOS:
            segments = list((paths.repo(repo) / "archive" / pgbackrest.STANZA).rglob("0*.lz4"))
            assert segments, f"no WAL segment in repo{repo}"
        archived = asyncio.run(
            _fetchval(cluster.first, "SELECT archived_count FROM pg_stat_archiver")
        )
        failed = asyncio.run(_fetchval(cluster.first, "SELECT failed_count FROM pg_stat_archiver"))
        assert isinstance(archived, int) and archived >= 3
        assert failed == 0
    finally:
        _stop_all(cluster)


def test_the_watchdog_promotes_the_standby_when_the_primary_dies(scratch: Path) -> None:
    cluster = _new_cluster(scratch, backups=False, standby=True)
    primary, standby = cluster.first, cluster.second
    try:
        ensure_replica(cluster, primary, standby, timeout=120)
        assert asyncio.run(replication_state(primary)) == "streaming/sync"
        asyncio.run(
            _execute(
                primary, "CREATE TABLE acked (id int PRIMARY KEY)", "INSERT INTO acked VALUES (1)"
            )
        )
        watchdog = Watchdog(cluster, WatchdogSettings())
        watchdog.step()  # a healthy primary: nothing to do
        assert cluster.primary() == primary

        kill(primary)
        deadline = time.monotonic() + 60
        while cluster.primary() != standby:
            assert time.monotonic() < deadline, "no promotion within 60s"
            watchdog.step()
        assert asyncio.run(in_recovery(standby)) is False
        # Committed on the old primary with synchronous replication: on the new one too.
        assert asyncio.run(_fetchval(standby, "SELECT count(*) FROM acked WHERE id = 1")) == 1
        asyncio.run(_execute(standby, "INSERT INTO acked VALUES (2)"))

        # The next steps rebuild the old primary as the new primary's synchronous standby.
        deadline = time.monotonic() + 120
        while asyncio.run(replication_state(standby)) != "streaming/sync":
            assert time.monotonic() < deadline, "the old primary did not come back as standby"
            watchdog.step()
            time.sleep(0.2)
        assert primary.is_standby and running_pid(primary) is not None
    finally:
        _stop_all(cluster)
