"""Redis 7: a private ``redis-server`` on 127.0.0.1 with append-only persistence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis
from redis.exceptions import RedisError

from tokvel_common import localstack
from tokvel_common.infra.component import ComponentStatus
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.process import (
    LOOPBACK,
    InfraError,
    adopt,
    live_pid,
    port_open,
    say,
    spawn_detached,
    stopwatch,
    terminate,
    wait_until,
)
from tokvel_common.infra.system import redis_server_binary

NAME = "redis"
STARTUP_TIMEOUT = 60.0  # a large AOF takes a while to load
STOP_TIMEOUT = 30.0  # SIGTERM makes Redis fsync the AOF before it exits


@dataclass(frozen=True)
class RedisPaths:
    home: Path  # <run>/redis: config and data
    pid: Path
    log: Path

    @property
    def conf(self) -> Path:
        return self.home / "redis.conf"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def markers(self) -> tuple[str, ...]:
        # The process title template below keeps the config path in the command line.
        return ("redis-server", str(self.conf))


def locate(layout: Layout) -> RedisPaths:
    run_dir = layout.run_dir
    return RedisPaths(run_dir / "redis", run_dir / "redis.pid", run_dir / "redis.log")


def config(paths: RedisPaths) -> str:
    settings = [
        ("bind", LOOPBACK),
        ("port", str(localstack.REDIS_PORT)),
        ("protected-mode", "yes"),  # loopback only anyway; no password needed
        ("daemonize", "no"),  # we detach it ourselves and track its pid
        ("pidfile", str(paths.pid)),
        ("logfile", str(paths.log)),
        ("loglevel", "notice"),
        ("dir", str(paths.data)),
        # Durability by the append-only file, fsynced every second: at most a second of
        # writes lost on a crash. RDB snapshots would only add I/O on top of it.
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("save", '""'),
        # Production shape (see tokvel_common.cache): under pressure only keys with a TTL are
        # evicted, so un-expiring keys such as ws_subs:* survive.
        ("maxmemory", "512mb"),
        ("maxmemory-policy", "volatile-lru"),
        ("tcp-keepalive", "60"),
        ("always-show-logo", "no"),
        ("set-proc-title", "yes"),
        ("proc-title-template", '"{title} {listen-addr} {server-mode} {config-file}"'),
    ]
    header = "# Written by `tokvel infra up` on every start: edit infra/redis.py instead.\n"
    return header + "".join(f"{name} {value}\n" for name, value in settings)


def ping() -> bool:
    client = redis.Redis(
        host=LOOPBACK, port=localstack.REDIS_PORT, socket_timeout=2, socket_connect_timeout=2
    )
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False  # includes LOADING while the AOF is replayed
    finally:
        client.close()


def _start(paths: RedisPaths) -> int:
    server = redis_server_binary()
    if server is None:
        raise InfraError("redis-server not found")
    if port_open(localstack.REDIS_PORT):
        raise InfraError(
            f"{NAME}: port {localstack.REDIS_PORT} is taken by a process we did not start"
        )
    paths.data.mkdir(parents=True, exist_ok=True)
    paths.conf.write_text(config(paths), encoding="utf-8")
    return spawn_detached([str(server), str(paths.conf)], log_path=paths.log, pid_path=paths.pid)


def up(layout: Layout) -> None:
    paths = locate(layout)
    with stopwatch() as elapsed:
        pid = adopt(paths.pid, paths.markers)
        if pid is not None:
            state = f"already running (pid {pid})"
        else:
            pid = _start(paths)
            state = f"started (pid {pid})"
        wait_until(ping, what=NAME, timeout=STARTUP_TIMEOUT, pid=pid, log_path=paths.log)
    say(f"  {NAME}: {state}, ready on {LOOPBACK}:{localstack.REDIS_PORT} ({elapsed():.1f}s)")


def down(layout: Layout) -> None:
    paths = locate(layout)
    pid = adopt(paths.pid, paths.markers)
    if pid is None:
        say(f"  {NAME}: not running")
        return
    with stopwatch() as elapsed:
        terminate(pid, name=NAME, timeout=STOP_TIMEOUT)
    paths.pid.unlink(missing_ok=True)
    say(f"  {NAME}: stopped pid {pid} ({elapsed():.1f}s)")


def status(layout: Layout) -> ComponentStatus:
    paths = locate(layout)
    return ComponentStatus(
        name=NAME,
        pid=live_pid(paths.pid, paths.markers),
        address=f"{LOOPBACK}:{localstack.REDIS_PORT}",
        accepting=port_open(localstack.REDIS_PORT),
        data_dir=paths.data,
        log=paths.log,
    )
