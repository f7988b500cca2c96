"""A private 3-master Redis Cluster on loopback, for the tests of the cluster code path.

``python -m tokvel_common.infra.redis_cluster up|down|status`` (the integration tests call
:func:`up` and :func:`down` themselves). Each node is a plain ``redis-server`` in cluster mode,
detached and tracked by a pid file like the rest of the local stack, with its config, data and
``nodes.conf`` under ``<run dir>/redis-cluster/<port>``. ``up`` is idempotent: running nodes are
adopted, and the slots are assigned (``redis-cli --cluster create``) only when the nodes do not
already form a healthy cluster; a half-formed one is reset first.

Nodes run as production does: ``maxmemory`` with ``volatile-lru``, so un-expiring keys
(``ws_subs:*``) are never evicted (see :mod:`tokvel_common.cache`); no persistence, since a
test cluster starts empty.
"""

from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Sequence
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
    run,
    say,
    spawn_detached,
    stopwatch,
    terminate,
    wait_until,
)
from tokvel_common.infra.system import redis_server_binary

NAME = "redis-cluster"
PORTS: tuple[int, ...] = tuple(port + localstack.PORT_OFFSET for port in (27380, 27381, 27382))
SLOTS = 16384
MAXMEMORY = "64mb"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REJOIN_TIMEOUT = 10.0


@dataclass(frozen=True)
class NodePaths:
    port: int
    home: Path  # config, nodes.conf
    pid: Path
    log: Path

    @property
    def conf(self) -> Path:
        return self.home / "redis.conf"

    @property
    def markers(self) -> tuple[str, ...]:
        return ("redis-server", str(self.conf))


def locate(layout: Layout, port: int) -> NodePaths:
    home = layout.run_dir / NAME / str(port)
    return NodePaths(port, home, home / "redis.pid", home / "redis.log")


def bus_port(port: int) -> int:
    return port - 1000


def url(ports: Sequence[int] = PORTS) -> str:
    """REDIS_URL for the cluster (any node; clients discover the others)."""
    return f"redis://{LOOPBACK}:{ports[0]}/0"


def config(paths: NodePaths, *, cluster: bool = True) -> str:
    cluster_settings = [
        ("cluster-enabled", "yes"),
        # Redis would take port + 10000 for the cluster bus: inside Linux's ephemeral range
        # (32768-60999), where an outgoing connection may hold it. Below the range instead.
        ("cluster-port", str(bus_port(paths.port))),
        ("cluster-config-file", "nodes.conf"),
        ("cluster-node-timeout", "5000"),
    ]
    settings = [
        ("bind", LOOPBACK),
        ("port", str(paths.port)),
        ("protected-mode", "yes"),
        ("daemonize", "no"),
        ("pidfile", str(paths.pid)),
        ("logfile", str(paths.log)),
        ("dir", str(paths.home)),
        *(cluster_settings if cluster else []),
        ("maxmemory", MAXMEMORY),
        ("maxmemory-policy", "volatile-lru"),
        ("appendonly", "no"),
        ("save", '""'),
        ("set-proc-title", "yes"),
        ("proc-title-template", '"{title} {listen-addr} {server-mode} {config-file}"'),
    ]
    header = "# Written by tokvel_common.infra.redis_cluster on every start.\n"
    return header + "".join(f"{name} {value}\n" for name, value in settings)


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=LOOPBACK, port=port, socket_timeout=2, socket_connect_timeout=2)


def ping(port: int) -> bool:
    client = _client(port)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def _cluster_info(port: int) -> dict[str, str]:
    client = _client(port)
    try:
        info = client.cluster("INFO")
        return {str(k): str(v) for k, v in info.items()}
    finally:
        client.close()


def healthy(ports: Sequence[int] = PORTS) -> bool:
    """Every node sees the same full cluster with all slots served."""
    try:
        infos = [_cluster_info(port) for port in ports]
    except (RedisError, OSError):
        return False
    return all(
        info.get("cluster_state") == "ok"
        and info.get("cluster_slots_ok") == str(SLOTS)
        and info.get("cluster_known_nodes") == str(len(ports))
        for info in infos
    )


def start_node(paths: NodePaths, *, cluster: bool = True) -> int:
    """Start one detached ``redis-server`` (a cluster node, or standalone); returns its pid."""
    server = redis_server_binary()
    if server is None:
        raise InfraError("redis-server not found (tokvel infra up installs it)")
    if port_open(paths.port):
        raise InfraError(f"{NAME}: port {paths.port} is taken by a process we did not start")
    paths.home.mkdir(parents=True, exist_ok=True)
    paths.conf.write_text(config(paths, cluster=cluster), encoding="utf-8")
    return spawn_detached([str(server), str(paths.conf)], log_path=paths.log, pid_path=paths.pid)


def wait_node(paths: NodePaths, pid: int) -> None:
    wait_until(
        functools.partial(ping, paths.port),
        what=f"{NAME} node {paths.port}",
        timeout=STARTUP_TIMEOUT,
        pid=pid,
        log_path=paths.log,
    )


def stop_node(paths: NodePaths) -> None:
    pid = live_pid(paths.pid, paths.markers)
    if pid is not None:
        terminate(pid, name=f"redis-server {paths.port}", timeout=STOP_TIMEOUT)
    paths.pid.unlink(missing_ok=True)


def _formed_before(ports: Sequence[int]) -> bool:
    """Some node remembers other nodes (its nodes.conf survived a restart)."""
    return any(int(_cluster_info(port).get("cluster_known_nodes", "1")) > 1 for port in ports)


def _reset(ports: Sequence[int]) -> None:
    """Forget a half-formed cluster so the slots can be assigned from scratch."""
    for port in ports:
        client = _client(port)
        try:
            client.flushall()
            client.cluster("RESET", "HARD")
        finally:
            client.close()


def _create(ports: Sequence[int]) -> None:
    cli = shutil.which("redis-cli")
    if cli is None:
        raise InfraError("redis-cli not found (Debian package redis-tools)")
    run(
        [
            cli,
            "--cluster",
            "create",
            *(f"{LOOPBACK}:{port}" for port in ports),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ],
        what=f"{NAME}: redis-cli --cluster create",
        timeout=60,
    )


def up(layout: Layout, ports: Sequence[int] = PORTS) -> str:
    """Start (or adopt) the nodes and make sure they form a healthy cluster; returns its URL."""
    with stopwatch() as elapsed:
        started = []
        for port in ports:
            paths = locate(layout, port)
            paths.home.mkdir(parents=True, exist_ok=True)
            pid = adopt(paths.pid, paths.markers)
            if pid is None:
                pid = start_node(paths)
                started.append(port)
            wait_node(paths, pid)
        if not healthy(ports):
            try:
                if not _formed_before(ports):
                    raise InfraError("fresh nodes")
                # Nodes restarted from their nodes.conf only need a moment to agree again.
                wait_until(lambda: healthy(ports), what=NAME, timeout=REJOIN_TIMEOUT)
            except InfraError:
                _reset(ports)
                _create(ports)
                wait_until(lambda: healthy(ports), what=NAME, timeout=STARTUP_TIMEOUT)
    state = f"started nodes {started}" if started else "already running"
    say(f"  {NAME}: {state}, healthy on {', '.join(map(str, ports))} ({elapsed():.1f}s)")
    return url(ports)


def down(layout: Layout, ports: Sequence[int] = PORTS) -> None:
    for port in ports:
        stop_node(locate(layout, port))
    say(f"  {NAME}: stopped")


def status(layout: Layout, ports: Sequence[int] = PORTS) -> list[ComponentStatus]:
    cluster_ok = healthy(ports)
    statuses = []
    for port in ports:
        paths = locate(layout, port)
        statuses.append(
            ComponentStatus(
                name=f"{NAME}:{port}",
                pid=live_pid(paths.pid, paths.markers),
                address=f"{LOOPBACK}:{port}",
                accepting=port_open(port),
                data_dir=paths.home,
                log=paths.log,
                note=None if cluster_ok else "cluster not formed (or not healthy)",
            )
        )
    return statuses


def main(argv: Sequence[str]) -> int:
    layout = Layout.from_environment()
    command = argv[0] if argv else "status"
    try:
        if command == "up":
            layout.ensure_run_dir()
            say(f"REDIS_CLUSTER=true REDIS_URL={up(layout)}")
        elif command == "down":
            down(layout)
        elif command == "status":
            for node in status(layout):
                say(f"{node.name:22} {node.state:10} pid {node.pid}  {node.note or ''}")
        else:
            say("usage: python -m tokvel_common.infra.redis_cluster up|down|status")
            return 2
    except InfraError as exc:
        say(f"{NAME}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
