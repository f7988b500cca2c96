"""PostgreSQL 15 nodes: private clusters on 127.0.0.1, owned by the ``tokvel`` superuser.

The local stack has one node (``postgresql``, port 25432) and, with a hot standby, a second one
(``postgresql-b``, the next port) inside the first one's home; :mod:`pg_cluster` decides which
node runs as what. This module knows how to create, configure, start, stop and reach one node.

PostgreSQL refuses to run as root, so when we are root initdb and pg_ctl run as the
unprivileged ``postgres`` system user (``runuser``) and the cluster's files belong to it. That
user must be able to reach the data dir: a clone under /root (mode 0700) is out of its reach,
and so is a run dir too deep for a unix socket path (107 bytes). Then the cluster lives in the
fallback dir, ``/var/tmp/tokvel-<sha256(run dir)[:12]>/postgres``, and ``status`` says so.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tokvel_common import localstack
from tokvel_common.infra.component import ComponentStatus
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.process import (
    LOOPBACK,
    InfraError,
    log_tail,
    matches,
    port_open,
    read_pid,
    run,
    say,
    terminate,
    wait_gone,
    wait_until,
)
from tokvel_common.infra.system import PG_BIN, PG_SYSTEM_USER, first_blocked, is_root

NAME = "postgresql"
SECOND_NAME = "postgresql-b"
SECOND_HOME = "node-b"  # the second node lives inside the first one's home: one dir to reset
SOCKET_PREFIX = ".s.PGSQL."
SOCKET_NAME = f"{SOCKET_PREFIX}{localstack.POSTGRES_PORT}"
# How long a start waits for a killed postmaster to be reaped before clearing its locks.
ZOMBIE_WAIT_SECONDS = 10.0
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
STANDBY_SIGNAL = "standby.signal"

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",  # every service keeps a pool, and tests clone databases
    "shared_buffers": "128MB",
    "fsync": "on",
    "synchronous_commit": "on",
    "wal_level": "replica",
    "max_wal_size": "1GB",
    "password_encryption": "'scram-sha-256'",
    "timezone": "'UTC'",
    "log_timezone": "'UTC'",
    "log_destination": "'stderr'",  # pg_ctl -l sends stderr to the log file
    "logging_collector": "off",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
}


@dataclass(frozen=True)
class PgPaths:
    """One node: its home dir (data, socket dir, log) and its port."""

    home: Path
    fallback_reason: str | None  # why the cluster is not in the run dir, or None
    port: int = localstack.POSTGRES_PORT
    name: str = NAME

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "socket"

    @property
    def log(self) -> Path:
        return self.home / "postgresql.log"

    @property
    def conf(self) -> Path:
        return self.data / "tokvel.conf"

    @property
    def postmaster_pid(self) -> Path:
        return self.data / "postmaster.pid"

    @property
    def markers(self) -> tuple[str, ...]:
        return (str(PG_BIN / "postgres"), str(self.data))

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").exists()

    @property
    def is_standby(self) -> bool:
        """Its data dir is set up to follow a primary (it would start in recovery)."""
        return (self.data / STANDBY_SIGNAL).exists()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def dsn(self, database: str = localstack.POSTGRES_DB) -> str:
        return (
            f"postgresql://{localstack.POSTGRES_USER}:{localstack.POSTGRES_PASSWORD}"
            f"@{self.address}/{database}"
        )


def second_node(first: PgPaths) -> PgPaths:
    """The hot standby's node: inside the first node's home, on the next port."""
    return dataclasses.replace(
        first, home=first.home / SECOND_HOME, port=first.port + 1, name=SECOND_NAME
    )


def _fallback_reason(layout: Layout, inside: Path) -> str | None:
    # The longest socket path is the second node's, one level deeper.
    socket = second_node(PgPaths(inside, None)).socket_dir / SOCKET_NAME
    if len(str(socket)) > MAX_SOCKET_PATH:
        return f"its socket path under the run dir would exceed {MAX_SOCKET_PATH} bytes"
    if not is_root():
        return None
    try:
        user = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        return None
    blocked = first_blocked(layout.run_dir, user)
    if blocked is not None:
        return f"user {PG_SYSTEM_USER!r} cannot traverse {blocked}"
    return None


def locate(layout: Layout) -> PgPaths:
    """The first node (or where it will be): the run dir when the PostgreSQL user can reach it."""
    inside = layout.run_dir / "postgres"
    fallback = layout.fallback_dir / "postgres"
    reason = _fallback_reason(layout, inside)
    if fallback.exists():
        return PgPaths(fallback, reason or "placed there by an earlier `tokvel infra up`")
    if inside.exists() or reason is None:
        return PgPaths(inside, None)
    return PgPaths(fallback, reason)


def all_homes(layout: Layout) -> tuple[Path, Path]:
    """Every place a cluster of this run dir may live (``reset`` clears both)."""
    return layout.run_dir / "postgres", layout.fallback_dir / "postgres"


def as_owner(argv: Sequence[str]) -> list[str]:
    """``argv`` run as the user that owns the clusters (ourselves unless we are root)."""
    if not is_root():
        return list(argv)
    return ["/usr/sbin/runuser", "-u", PG_SYSTEM_USER, "--", *argv]


def give(path: Path) -> None:
    """Hand ``path`` to the PostgreSQL user (only needed, and only possible, as root)."""
    if is_root():
        user = pwd.getpwnam(PG_SYSTEM_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def make_dirs(*directories: Path, mode: int = 0o755) -> None:
    """Create each directory the PostgreSQL user owns (``mode`` only for the new ones)."""
    for directory in directories:
        if not directory.is_dir():
            directory.mkdir(parents=True)
            directory.chmod(mode)
        give(directory)


def make_home(node: PgPaths) -> None:
    if not node.home.parent.is_dir():
        node.home.parent.mkdir(parents=True)
        node.home.parent.chmod(0o755)
    # Clients reach the socket, so 0755; data/ itself is 0700.
    make_dirs(node.home, node.socket_dir)


def initdb(node: PgPaths) -> None:
    make_home(node)
    pwfile = node.home / ".initdb-password"
    # Created 0600 before the secret is written, so no other user can read it in between.
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(localstack.POSTGRES_PASSWORD + "\n")
    give(pwfile)
    try:
        run(
            as_owner(
                [
                    str(PG_BIN / "initdb"),
                    "--pgdata",
                    str(node.data),
                    "--username",
                    localstack.POSTGRES_USER,
                    f"--pwfile={pwfile}",
                    # Passwords on TCP and on the socket alike: the socket dir may be reachable
                    # by other local users.
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-locale",  # C collation: byte order, the same on every machine
                ]
            ),
            what="initdb",
            timeout=180,
            cwd=node.home,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    with (node.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write("\n# tokvel: the local stack's settings, rewritten by `tokvel infra up`\n")
        conf.write("include = 'tokvel.conf'\n")


def conf_string(value: str) -> str:
    """A postgresql.conf string literal."""
    return "'" + value.replace("'", "''") + "'"


def write_settings(node: PgPaths, extra: Mapping[str, str] | None = None) -> None:
    """The node's ``tokvel.conf``: the common settings, its port and socket, then ``extra``."""
    settings = {
        **SETTINGS,
        "port": str(node.port),
        "unix_socket_directories": conf_string(str(node.socket_dir)),
        **(extra or {}),
    }
    lines = ["# Written by `tokvel infra up`: edit infra/postgres.py and pg_cluster.py instead."]
    lines += [f"{name} = {value}" for name, value in settings.items()]
    tmp = node.conf.with_name(node.conf.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    give(tmp)
    tmp.replace(node.conf)  # the server may re-read it at any moment: never half-written


def running_pid(node: PgPaths) -> int | None:
    pid = read_pid(node.postmaster_pid)
    return pid if pid is not None and matches(pid, node.markers) else None


def _unreaped(pid: int) -> bool:
    """A process that died and is not reaped yet (a zombie): it holds no files nor sockets."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _clear_stale_lock(node: PgPaths) -> None:
    # A postmaster.pid naming a reused pid (say, after a container restart) stops PostgreSQL
    # from starting; one whose process is not our postmaster is stale. So does the socket's
    # lock file of a postmaster killed a moment ago: PostgreSQL takes a zombie for alive.
    if running_pid(node) is not None:
        return
    old_pid = read_pid(node.postmaster_pid)
    if old_pid is not None:
        deadline = time.monotonic() + ZOMBIE_WAIT_SECONDS
        while _unreaped(old_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    socket_lock = node.socket_dir / f"{SOCKET_PREFIX}{node.port}.lock"
    for stale in (node.postmaster_pid, socket_lock):
        if stale.exists():
            say(f"  {node.name}: removing stale {stale}")
            stale.unlink(missing_ok=True)


async def connect(
    node: PgPaths, database: str = localstack.POSTGRES_DB, *, wait_seconds: float = 10
) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(
        host=LOOPBACK,
        port=node.port,
        user=localstack.POSTGRES_USER,
        password=localstack.POSTGRES_PASSWORD,
        database=database,
        timeout=wait_seconds,
    )
    return conn


async def ensure_database(node: PgPaths) -> bool:
    """Create the ``tokvel`` database if absent; True when it was created now."""
    conn = await connect(node, "postgres")
    try:
        if await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", localstack.POSTGRES_DB
        ):
            return False
        await conn.execute(
            f'CREATE DATABASE "{localstack.POSTGRES_DB}" OWNER "{localstack.POSTGRES_USER}"'
        )
        return True
    finally:
        await conn.close()


async def in_recovery(node: PgPaths, *, wait_seconds: float = 5) -> bool | None:
    """True on a standby (or a node still replaying WAL), False on a primary, None: no answer."""
    try:
        conn = await connect(node, "postgres", wait_seconds=wait_seconds)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    try:
        return bool(await conn.fetchval("SELECT pg_is_in_recovery()", timeout=wait_seconds))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return None
    finally:
        await conn.close(timeout=wait_seconds)


async def healthy(node: PgPaths) -> bool:
    """A real login to the node's ``tokvel`` database and a query."""
    try:
        conn = await asyncpg.connect(node.dsn(), timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


def start(node: PgPaths, settings: Mapping[str, str] | None = None) -> None:
    """Write the node's settings and start it; returns once it accepts connections.

    A node that recovers from a backup or follows a primary accepts read-only connections
    before it is done; :func:`in_recovery` tells.
    """
    if port_open(node.port):
        raise InfraError(f"{node.name}: port {node.port} is taken by a process we did not start")
    _clear_stale_lock(node)
    make_home(node)
    write_settings(node, settings)
    try:
        run(
            as_owner(
                [
                    str(PG_BIN / "pg_ctl"),
                    "start",
                    "--pgdata",
                    str(node.data),
                    "--log",
                    str(node.log),
                    "--wait",
                    "--timeout=120",
                    "--silent",
                ]
            ),
            what=f"pg_ctl start ({node.name})",
            timeout=150,
            cwd=node.home,
            new_session=True,  # the postmaster must not share our terminal's signals
        )
    except InfraError as exc:
        raise InfraError(f"{exc}\n  last lines of {node.log}:\n{log_tail(node.log)}") from exc


def reload(node: PgPaths) -> None:
    """Make the running node re-read its configuration files (SIGHUP to the postmaster)."""
    pid = running_pid(node)
    if pid is None:
        raise InfraError(f"{node.name}: not running, cannot reload its settings")
    os.kill(pid, signal.SIGHUP)


def promote(node: PgPaths) -> None:
    """End the standby's recovery: it becomes a primary on a new timeline."""
    run(
        as_owner([str(PG_BIN / "pg_ctl"), "promote", "--pgdata", str(node.data), "--wait"]),
        what=f"pg_ctl promote ({node.name})",
        timeout=90,
        cwd=node.home,
    )


def stop(node: PgPaths) -> int | None:
    """Stop the node if it runs (fast shutdown, immediate if that fails); its former pid."""
    pid = running_pid(node)
    if pid is None:
        return None
    try:
        # Fast: roll back open sessions and checkpoint; pg_ctl waits for every backend.
        run(
            as_owner(
                [
                    str(PG_BIN / "pg_ctl"),
                    "stop",
                    "--pgdata",
                    str(node.data),
                    "--mode=fast",
                    "--wait",
                    "--timeout=60",
                    "--silent",
                ]
            ),
            what=f"pg_ctl stop ({node.name})",
            timeout=90,
            cwd=node.home,
        )
    except InfraError as exc:
        say(f"  {node.name}: {exc}\n  {node.name}: immediate shutdown of pid {pid}")
        terminate(pid, name=node.name, timeout=15, first=signal.SIGQUIT)
    if not wait_gone(pid, 10):
        raise InfraError(f"{node.name}: postmaster {pid} still running after pg_ctl stop")
    return pid


def kill(node: PgPaths) -> int | None:
    """SIGKILL the postmaster (a crash: no checkpoint, no goodbye to clients); its pid."""
    pid = running_pid(node)
    if pid is None:
        return None
    os.kill(pid, signal.SIGKILL)
    # The backends notice their postmaster is gone and exit on their own; wait for the
    # postmaster only, and for its port to close so nobody reconnects to a dying node.
    wait_gone(pid, 10)
    return pid


def status(node: PgPaths, role: str | None = None) -> ComponentStatus:
    notes = [role] if role else []
    if node.fallback_reason:
        notes.append(f"outside the run dir: {node.fallback_reason}")
    return ComponentStatus(
        name=node.name,
        pid=running_pid(node),
        address=f"{node.address} (socket dir {node.socket_dir})",
        accepting=port_open(node.port),
        data_dir=node.data,
        log=node.log,
        note="; ".join(notes) or None,
    )


def wait_writable(node: PgPaths, timeout: float) -> None:
    """Wait until the node is a primary that answers (recovery from a backup may take a while)."""
    wait_until(
        lambda: asyncio.run(in_recovery(node)) is False,
        what=f"{node.name} as a writable primary",
        timeout=timeout,
        log_path=node.log,
        interval=0.2,
    )
