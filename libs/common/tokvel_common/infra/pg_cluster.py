"""The local stack's PostgreSQL: one node, or a primary and a hot standby; backups optional.

Two options, read from the environment by ``tokvel infra up`` (``1`` on, ``0`` off). Each is
sticky: unset, it stays as the run dir already has it, so a later plain ``tokvel infra up`` never
silently turns WAL archiving off (a gap in the archive) or leaves a standby behind.

``TOKVEL_PG_BACKUPS=1``
    WAL archiving with pgBackRest into two repositories, and the backup scheduler
    (:mod:`backups`), a small process of ours started and stopped with the stack: backups are
    part of the database's life, not of the application services the supervisor runs.
``TOKVEL_PG_STANDBY=1``
    A second node (``postgresql-b``, port 25433 + offset) following the primary by synchronous
    streaming replication, and the watchdog (:mod:`pg_watchdog`) that promotes it when the
    primary dies and rebuilds the lost node as the new standby. The services then need the
    multi-host ``DATABASE_URL`` that ``tokvel infra env`` prints (``target_session_attrs=
    read-write``): asyncpg tries both nodes and keeps the writable one, so they reconnect to the
    new primary by themselves.

Which node is the primary is written in ``roles.json`` in the first node's home (absent: the
first node). Synchronous replication is strict: once the standby streams, the primary's
``synchronous_standby_names`` names it and a commit returns only once the standby has flushed
it, so a promotion loses no acknowledged write; while the standby is down, commits wait (the
watchdog restarts or rebuilds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson

from tokvel_common import localstack
from tokvel_common.infra import pgbackrest
from tokvel_common.infra.component import ComponentStatus
from tokvel_common.infra.layout import RUN_DIR_ENV, Layout
from tokvel_common.infra.pgbackrest import BackrestPaths, BackupSettings
from tokvel_common.infra.postgres import (
    PgPaths,
    as_owner,
    conf_string,
    connect,
    ensure_database,
    give,
    healthy,
    initdb,
    kill,
    locate,
    make_home,
    promote,
    reload,
    running_pid,
    second_node,
    start,
    status,
    stop,
    wait_writable,
    write_settings,
)
from tokvel_common.infra.process import (
    LOOPBACK,
    InfraError,
    adopt,
    live_pid,
    run,
    say,
    spawn_detached,
    stopwatch,
    terminate,
    wait_until,
)
from tokvel_common.infra.system import PG_BIN

BACKUPS_ENV = "TOKVEL_PG_BACKUPS"
STANDBY_ENV = "TOKVEL_PG_STANDBY"
APPLICATION_NAME = "tokvel_standby"  # what synchronous_standby_names waits for
ROLES_FILE = "roles.json"
READY_TIMEOUT_SECONDS = 180.0
WATCHDOG_MODULE = "tokvel_common.infra.pg_watchdog"
SCHEDULER_MODULE = "tokvel_common.infra.backups"


@dataclass(frozen=True)
class Daemon:
    """A helper process of ours started with the stack, tracked by a pid file in the pg home."""

    name: str
    argv: tuple[str, ...]  # after ``python -m``
    home: Path
    run_dir: Path

    @property
    def pid_path(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    def log_path(self) -> Path:
        return self.home / f"{self.name}.log"

    @property
    def markers(self) -> tuple[str, ...]:
        return (*self.argv, str(self.run_dir))


@dataclass(frozen=True)
class PgCluster:
    first: PgPaths  # the node of a single-node stack, the primary until a failover
    run_dir: Path
    backups: bool
    standby: bool

    @property
    def second(self) -> PgPaths:
        return second_node(self.first)

    @property
    def home(self) -> Path:
        return self.first.home

    @property
    def nodes(self) -> tuple[PgPaths, ...]:
        """The nodes in use: both with a standby, else the primary alone."""
        return (self.first, self.second) if self.standby else (self.primary(),)

    @property
    def backrest(self) -> BackrestPaths:
        return BackrestPaths(self.home / "pgbackrest")

    @property
    def roles_file(self) -> Path:
        return self.home / ROLES_FILE

    @property
    def lock_file(self) -> Path:
        return self.home / ".keeper.lock"

    @property
    def watchdog(self) -> Daemon:
        return Daemon("watchdog", ("-m", WATCHDOG_MODULE), self.home, self.run_dir)

    @property
    def scheduler(self) -> Daemon:
        return Daemon(
            "backup-scheduler", ("-m", SCHEDULER_MODULE, "schedule"), self.home, self.run_dir
        )

    def primary(self) -> PgPaths:
        """The node that is (or is to be) the primary, as ``roles.json`` says."""
        try:
            name = orjson.loads(self.roles_file.read_bytes())["primary"]
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
            return self.first
        return self.second if name == self.second.name else self.first

    def replica(self) -> PgPaths | None:
        """The standby's node, when the stack has one."""
        if not self.standby:
            return None
        return self.first if self.primary() == self.second else self.second

    def database_url(self, database: str = localstack.POSTGRES_DB) -> str:
        """The services' DSN: every node, and only the writable one is kept."""
        if not self.standby:
            return self.primary().dsn(database)
        hosts = ",".join(node.address for node in self.nodes)
        return (
            f"postgresql://{localstack.POSTGRES_USER}:{localstack.POSTGRES_PASSWORD}@{hosts}"
            f"/{database}?target_session_attrs=read-write"
        )


def _flag(environ: Mapping[str, str], name: str, *, already: bool) -> bool:
    value = environ.get(name, "").strip().lower()
    if not value:
        return already
    return value in {"1", "true", "yes", "on"}


def cluster_of(layout: Layout, environ: Mapping[str, str] | None = None) -> PgCluster:
    env = os.environ if environ is None else environ
    first = locate(layout)
    probe = PgCluster(first, layout.run_dir, backups=False, standby=False)
    return PgCluster(
        first,
        layout.run_dir,
        backups=_flag(env, BACKUPS_ENV, already=probe.backrest.configured),
        standby=_flag(env, STANDBY_ENV, already=probe.second.initialized),
    )


@contextlib.contextmanager
def keeper_lock(cluster: PgCluster) -> Iterator[None]:
    """One actor at a time changes the nodes: ``tokvel infra up`` or the watchdog."""
    make_home(cluster.first)
    with cluster.lock_file.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_primary(cluster: PgCluster, node: PgPaths) -> None:
    tmp = cluster.roles_file.with_name(ROLES_FILE + ".tmp")
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    tmp.write_bytes(orjson.dumps({"primary": node.name, "since": stamp}))
    tmp.replace(cluster.roles_file)


# ----------------------------------------------------------------------------- node settings


def slot_name(node: PgPaths) -> str:
    """The replication slot that keeps WAL on the primary for ``node`` (as standby)."""
    return "tokvel_" + node.name.replace("-", "_")


def settings_for(
    cluster: PgCluster, node: PgPaths, *, follow: PgPaths | None, sync: bool
) -> dict[str, str]:
    """What the node's tokvel.conf adds to the common settings, for its role."""
    extra: dict[str, str] = {}
    if cluster.backups:
        extra.update(pgbackrest.archive_settings(cluster.backrest, node))
    if follow is not None:
        conninfo = (
            f"host={LOOPBACK} port={follow.port} user={localstack.POSTGRES_USER} "
            f"password={localstack.POSTGRES_PASSWORD} application_name={APPLICATION_NAME}"
        )
        extra["primary_conninfo"] = conf_string(conninfo)
        extra["primary_slot_name"] = conf_string(slot_name(node))
    if sync:
        extra["synchronous_standby_names"] = conf_string(APPLICATION_NAME)
    return extra


def set_synchronous(cluster: PgCluster, primary: PgPaths, sync: bool) -> None:
    write_settings(primary, settings_for(cluster, primary, follow=None, sync=sync))
    reload(primary)


async def replication_state(primary: PgPaths) -> str | None:
    """How the standby is attached to ``primary``: e.g. ``streaming/sync``; None when it is not."""
    try:
        conn = await connect(primary, "postgres", wait_seconds=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        row = await conn.fetchrow(
            "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = $1",
            APPLICATION_NAME,
            timeout=5,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    finally:
        await conn.close(timeout=5)
    return None if row is None else f"{row['state']}/{row['sync_state']}"


async def _drop_slot(primary: PgPaths, slot: str) -> None:
    conn = await connect(primary, "postgres")
    try:
        await conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = $1 AND NOT active",
            slot,
        )
    finally:
        await conn.close()


def rebuild_replica(primary: PgPaths, replica: PgPaths) -> None:
    """A fresh copy of the primary in the replica's data dir, set up to follow it."""
    stop(replica)
    shutil.rmtree(replica.data, ignore_errors=True)
    make_home(replica)
    slot = slot_name(replica)
    asyncio.run(_drop_slot(primary, slot))  # left by an earlier copy of this node
    run(
        as_owner(
            [
                str(PG_BIN / "pg_basebackup"),
                f"--pgdata={replica.data}",
                f"--host={LOOPBACK}",
                f"--port={primary.port}",
                f"--username={localstack.POSTGRES_USER}",
                "--no-password",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--create-slot",
                f"--slot={slot}",
            ]
        ),
        what=f"pg_basebackup ({primary.name} -> {replica.name})",
        timeout=1800,
        env={**os.environ, "PGPASSWORD": localstack.POSTGRES_PASSWORD},
        cwd=replica.home,
    )
    signal_file = replica.data / "standby.signal"
    signal_file.touch()
    give(signal_file)


def ensure_replica(
    cluster: PgCluster, primary: PgPaths, replica: PgPaths, *, timeout: float
) -> str:
    """The replica running, streaming from ``primary``, and synchronous; what was done."""
    done = "following"
    if not replica.initialized or not replica.is_standby:
        # No data, or a former primary whose history went its own way: a new copy.
        why = "no data" if not replica.initialized else "a former primary"
        rebuild_replica(primary, replica)
        done = f"rebuilt from {primary.name} ({why})"
    if running_pid(replica) is None:
        start(replica, settings_for(cluster, replica, follow=primary, sync=False))
        done += ", started"
    wait_until(
        lambda: (asyncio.run(replication_state(primary)) or "").startswith("streaming/"),
        what=f"{replica.name} streaming from {primary.name}",
        timeout=timeout,
        log_path=replica.log,
        interval=0.25,
    )
    set_synchronous(cluster, primary, True)
    # The reload is asynchronous: done once the primary reports the standby as synchronous.
    wait_until(
        lambda: asyncio.run(replication_state(primary)) == "streaming/sync",
        what=f"{replica.name} as the synchronous standby of {primary.name}",
        timeout=timeout,
        log_path=primary.log,
        interval=0.1,
    )
    return done


def fail_over(cluster: PgCluster, old: PgPaths, new: PgPaths) -> None:
    """Fence the old primary (SIGKILL if it still runs), promote the standby, record it."""
    kill(old)
    promote(new)
    write_primary(cluster, new)
    # No standby until the old node is rebuilt: no synchronous wait, and no primary_conninfo.
    write_settings(new, settings_for(cluster, new, follow=None, sync=False))
    reload(new)


# ---------------------------------------------------------------------------------- daemons


def start_daemon(daemon: Daemon) -> str:
    pid = adopt(daemon.pid_path, daemon.markers)
    if pid is not None:
        return f"{daemon.name} running (pid {pid})"
    pid = spawn_detached(
        [sys.executable, *daemon.argv, str(daemon.run_dir)],
        log_path=daemon.log_path,
        pid_path=daemon.pid_path,
        env={**os.environ, RUN_DIR_ENV: str(daemon.run_dir)},
    )
    return f"{daemon.name} started (pid {pid})"


def stop_daemon(daemon: Daemon) -> None:
    pid = adopt(daemon.pid_path, daemon.markers)
    if pid is not None:
        terminate(pid, name=daemon.name, timeout=30)
        say(f"  {daemon.name}: stopped pid {pid}")
    daemon.pid_path.unlink(missing_ok=True)


# --------------------------------------------------------------------- tokvel infra up/down


def _start_primary(cluster: PgCluster, primary: PgPaths) -> str:
    replica = cluster.replica()
    if not primary.initialized:
        if replica is not None and replica.initialized:
            raise InfraError(
                f"{primary.name} is the primary ({cluster.roles_file}) but has no data, while "
                f"{replica.name} has: restore a backup, or make {replica.name} the primary in "
                f"{cluster.roles_file} if it holds the newest data"
            )
        initdb(primary)
        say(f"  {primary.name}: initialized cluster in {primary.data}")
    pid = running_pid(primary)
    if pid is not None and asyncio.run(_archive_mode(primary)) != cluster.backups:
        # archive_mode only changes with a restart: backups were just turned on (or off).
        turned = "on" if cluster.backups else "off"
        say(f"  {primary.name}: restarting to turn WAL archiving {turned}")
        stop(primary)
        pid = None
    if pid is not None:
        if cluster.standby:
            # The primary may have been the standby until a failover: rewritten and reloaded,
            # keeping the synchronous standby if it is attached now (ensure_replica re-checks).
            attached = asyncio.run(replication_state(primary)) or ""
            set_synchronous(cluster, primary, attached.endswith("/sync"))
        return f"already running (pid {pid})"
    start(primary, settings_for(cluster, primary, follow=None, sync=False))
    return f"started (pid {running_pid(primary)})"


async def _archive_mode(node: PgPaths) -> bool:
    conn = await connect(node, "postgres")
    try:
        return bool(await conn.fetchval("SHOW archive_mode") != "off")
    finally:
        await conn.close()


def up(layout: Layout) -> None:
    cluster = cluster_of(layout)
    if cluster.first.fallback_reason:
        say(f"  {cluster.first.name}: data in {cluster.home} ({cluster.first.fallback_reason})")
    with stopwatch() as elapsed, keeper_lock(cluster):
        primary = cluster.primary()
        state = _start_primary(cluster, primary)
        # A node restored from a backup replays WAL before it takes writes.
        wait_writable(primary, READY_TIMEOUT_SECONDS)
        created = asyncio.run(ensure_database(primary))
        if not asyncio.run(healthy(primary)):
            raise InfraError(f"{primary.name}: cannot log in to {primary.dsn()}")
        extra = f", created database {localstack.POSTGRES_DB!r}" if created else ""
        say(f"  {primary.name}: {state}, ready on {primary.address}{extra} ({elapsed():.1f}s)")
        if cluster.backups:
            pgbackrest.prepare(cluster.backrest, cluster.nodes, BackupSettings())
            pgbackrest.stanza_create(cluster.backrest)
            say(f"  pgbackrest: WAL archived to repo1 and repo2 in {cluster.backrest.root}")
        replica = cluster.replica()
        if replica is not None:
            done = ensure_replica(cluster, primary, replica, timeout=READY_TIMEOUT_SECONDS)
            say(f"  {replica.name}: standby on {replica.address}, {done}, synchronous")
    if cluster.backups:
        say(f"  {start_daemon(cluster.scheduler)}")
    if cluster.standby:
        say(f"  {start_daemon(cluster.watchdog)}")


def down(layout: Layout) -> None:
    cluster = cluster_of(layout)
    # The watchdog first: a planned stop of the primary is not a failure to act on.
    for daemon in (cluster.watchdog, cluster.scheduler):
        stop_daemon(daemon)
    primary = cluster.primary()
    ordered = [primary, *(n for n in (cluster.first, cluster.second) if n != primary)]
    for node in ordered:
        with stopwatch() as elapsed:
            pid = stop(node)
        if pid is not None:
            say(f"  {node.name}: stopped pid {pid} ({elapsed():.1f}s)")
        elif node == cluster.first:
            say(f"  {node.name}: not running")


def statuses(layout: Layout) -> list[ComponentStatus]:
    cluster = cluster_of(layout)
    primary = cluster.primary()
    daemons = [
        f"{d.name} pid {pid}"
        for d, on in ((cluster.watchdog, cluster.standby), (cluster.scheduler, cluster.backups))
        if on and (pid := live_pid(d.pid_path, d.markers)) is not None
    ]
    role = "primary" if cluster.standby else None
    found = [status(primary, "; ".join(filter(None, [role, *daemons])) or None)]
    replica = cluster.replica()
    if replica is not None:
        found.append(status(replica, "standby" if replica.is_standby else "to be rebuilt"))
    return found
