"""PostgreSQL 15: a private cluster on 127.0.0.1, owned by the ``tokvel`` superuser.

PostgreSQL refuses to run as root, so when we are root initdb and pg_ctl run as the
unprivileged ``postgres`` system user (``runuser``) and the cluster's files belong to it. That
user must be able to reach the data dir: a clone under /root (mode 0700) is out of its reach,
and so is a run dir too deep for a unix socket path (107 bytes). Then the cluster lives in the
fallback dir, ``/var/tmp/tokvel-<sha256(run dir)[:12]>/postgres``, and ``status`` says so.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
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
    stopwatch,
    terminate,
    wait_gone,
)
from tokvel_common.infra.system import PG_BIN, PG_SYSTEM_USER, first_blocked, is_root

NAME = "postgresql"
SOCKET_NAME = f".s.PGSQL.{localstack.POSTGRES_PORT}"
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux

SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "port": str(localstack.POSTGRES_PORT),
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
    home: Path
    fallback_reason: str | None  # why the cluster is not in the run dir, or None

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


def _fallback_reason(layout: Layout, inside: Path) -> str | None:
    socket = inside / "socket" / SOCKET_NAME
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
    """Where the cluster is (or will be): the run dir when the PostgreSQL user can reach it."""
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


def _as_owner(argv: list[str]) -> list[str]:
    if not is_root():
        return argv
    return ["/usr/sbin/runuser", "-u", PG_SYSTEM_USER, "--", *argv]


def _give(path: Path) -> None:
    """Hand ``path`` to the PostgreSQL user (only needed, and only possible, as root)."""
    if is_root():
        user = pwd.getpwnam(PG_SYSTEM_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def _make_home(paths: PgPaths) -> None:
    for directory in (paths.home.parent, paths.home, paths.socket_dir):
        if not directory.is_dir():
            directory.mkdir(parents=True)
            directory.chmod(0o755)  # clients reach the socket; data/ itself is 0700
    _give(paths.home)
    _give(paths.socket_dir)


def _initdb(paths: PgPaths) -> None:
    _make_home(paths)
    pwfile = paths.home / ".initdb-password"
    # Created 0600 before the secret is written, so no other user can read it in between.
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(localstack.POSTGRES_PASSWORD + "\n")
    _give(pwfile)
    try:
        run(
            _as_owner(
                [
                    str(PG_BIN / "initdb"),
                    "--pgdata",
                    str(paths.data),
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
            cwd=paths.home,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    with (paths.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write("\n# tokvel: the local stack's settings, rewritten by `tokvel infra up`\n")
        conf.write("include = 'tokvel.conf'\n")


def _write_settings(paths: PgPaths) -> None:
    settings = {**SETTINGS, "unix_socket_directories": f"'{paths.socket_dir}'"}
    lines = ["# Written by `tokvel infra up` on every start: edit infra/postgres.py instead."]
    lines += [f"{name} = {value}" for name, value in settings.items()]
    paths.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _give(paths.conf)


def running_pid(paths: PgPaths) -> int | None:
    pid = read_pid(paths.postmaster_pid)
    return pid if pid is not None and matches(pid, paths.markers) else None


def _clear_stale_lock(paths: PgPaths) -> None:
    # A postmaster.pid naming a reused pid (say, after a container restart) stops PostgreSQL
    # from starting; one whose process is not our postmaster is stale.
    if paths.postmaster_pid.exists() and running_pid(paths) is None:
        say(f"  {NAME}: removing stale {paths.postmaster_pid}")
        paths.postmaster_pid.unlink()


async def _ensure_database() -> bool:
    """Create the ``tokvel`` database if absent; True when it was created now."""
    conn = await asyncpg.connect(
        host=LOOPBACK,
        port=localstack.POSTGRES_PORT,
        user=localstack.POSTGRES_USER,
        password=localstack.POSTGRES_PASSWORD,
        database="postgres",
        timeout=10,
    )
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


async def healthy() -> bool:
    """A real login to DATABASE_URL and a query."""
    try:
        conn = await asyncpg.connect(localstack.DATABASE_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


def _start(paths: PgPaths) -> None:
    if port_open(localstack.POSTGRES_PORT):
        raise InfraError(
            f"{NAME}: port {localstack.POSTGRES_PORT} is taken by a process we did not start"
        )
    _clear_stale_lock(paths)
    _make_home(paths)
    _write_settings(paths)
    try:
        run(
            _as_owner(
                [
                    str(PG_BIN / "pg_ctl"),
                    "start",
                    "--pgdata",
                    str(paths.data),
                    "--log",
                    str(paths.log),
                    "--wait",
                    "--timeout=120",
                    "--silent",
                ]
            ),
            what="pg_ctl start",
            timeout=150,
            cwd=paths.home,
            new_session=True,  # the postmaster must not share our terminal's signals
        )
    except InfraError as exc:
        raise InfraError(f"{exc}\n  last lines of {paths.log}:\n{log_tail(paths.log)}") from exc


def up(layout: Layout) -> None:
    paths = locate(layout)
    if paths.fallback_reason:
        say(f"  {NAME}: data in {paths.home} ({paths.fallback_reason})")
    with stopwatch() as elapsed:
        pid = running_pid(paths)
        if pid is not None:
            state = f"already running (pid {pid})"
        else:
            if not (paths.data / "PG_VERSION").exists():
                _initdb(paths)
                say(f"  {NAME}: initialized cluster in {paths.data} ({elapsed():.1f}s)")
            _start(paths)
            pid = running_pid(paths)
            state = f"started (pid {pid})"
        created = asyncio.run(_ensure_database())
        if not asyncio.run(healthy()):
            raise InfraError(f"{NAME}: cannot log in to {localstack.DATABASE_URL}")
    extra = f", created database {localstack.POSTGRES_DB!r}" if created else ""
    say(
        f"  {NAME}: {state}, ready on {LOOPBACK}:{localstack.POSTGRES_PORT}{extra}"
        f" ({elapsed():.1f}s)"
    )


def down(layout: Layout) -> None:
    paths = locate(layout)
    pid = running_pid(paths)
    if pid is None:
        say(f"  {NAME}: not running")
        return
    with stopwatch() as elapsed:
        try:
            # Fast: roll back open sessions and checkpoint; pg_ctl waits for every backend.
            run(
                _as_owner(
                    [
                        str(PG_BIN / "pg_ctl"),
                        "stop",
                        "--pgdata",
                        str(paths.data),
                        "--mode=fast",
                        "--wait",
                        "--timeout=60",
                        "--silent",
                    ]
                ),
                what="pg_ctl stop",
                timeout=90,
                cwd=paths.home,
            )
        except InfraError as exc:
            say(f"  {NAME}: {exc}\n  {NAME}: immediate shutdown of pid {pid}")
            terminate(pid, name=NAME, timeout=15, first=signal.SIGQUIT)
        if not wait_gone(pid, 10):
            raise InfraError(f"{NAME}: postmaster {pid} still running after pg_ctl stop")
    say(f"  {NAME}: stopped pid {pid} ({elapsed():.1f}s)")


def status(layout: Layout) -> ComponentStatus:
    paths = locate(layout)
    note = f"outside the run dir: {paths.fallback_reason}" if paths.fallback_reason else None
    return ComponentStatus(
        name=NAME,
        pid=running_pid(paths),
        address=f"{LOOPBACK}:{localstack.POSTGRES_PORT} (socket dir {paths.socket_dir})",
        accepting=port_open(localstack.POSTGRES_PORT),
        data_dir=paths.data,
        log=paths.log,
        note=note,
    )
