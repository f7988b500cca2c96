"""The three services together: what ``tokvel infra up|down|status|reset|env`` do."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from tokvel_common import localstack
from tokvel_common.infra import kafka, pg_cluster, postgres, redis
from tokvel_common.infra.component import ComponentStatus
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.process import say, stopwatch
from tokvel_common.infra.system import ensure_packages, ensure_system_user, is_root


def env_lines() -> list[str]:
    """The stack's connection settings as ``NAME=value`` lines a shell can source."""
    return [
        f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{localstack.KAFKA_PORT}",
        f"DATABASE_URL={pg_cluster.cluster_of(Layout.from_environment()).database_url()}",
        f"REDIS_URL={localstack.REDIS_URL}",
    ]


@contextlib.contextmanager
def _locked(layout: Layout, *, create: bool) -> Iterator[None]:
    """One ``up``/``down``/``reset`` at a time per run dir (``make -j`` may start two)."""
    if create:
        layout.ensure_run_dir()
    elif not layout.run_dir.is_dir():
        yield  # nothing of ours can be running without a run dir to record it
        return
    with layout.lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def up(layout: Layout) -> None:
    say(f"tokvel infra up (run dir {layout.run_dir})")
    with stopwatch() as elapsed, _locked(layout, create=True):
        ensure_packages(layout.apt_log)
        if is_root():
            ensure_system_user()
        kafka.prepare(layout)
        # Kafka is the slowest to come up: start it first, bring up the others meanwhile.
        started_at = time.monotonic()
        pid, state = kafka.start(layout)
        pg_cluster.up(layout)
        redis.up(layout)
        kafka.wait_ready(layout, pid, state, started_at)
    say(f"stack up in {elapsed():.1f}s; connection settings: tokvel infra env")


def _stop_all(layout: Layout) -> None:
    kafka.down(layout)
    redis.down(layout)
    pg_cluster.down(layout)


def down(layout: Layout) -> None:
    say(f"tokvel infra down (run dir {layout.run_dir})")
    with stopwatch() as elapsed, _locked(layout, create=False):
        _stop_all(layout)
    say(f"stack down in {elapsed():.1f}s")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        say(f"  removed {path}")
    elif path.exists() or path.is_symlink():
        path.unlink()


def reset(layout: Layout) -> None:
    """Stop everything, then delete what we created (the jar cache stays)."""
    say(f"tokvel infra reset (run dir {layout.run_dir})")
    kafka_paths = kafka.locate(layout)
    redis_paths = redis.locate(layout)
    # Only the entries we create: TOKVEL_RUN_DIR may point at a directory holding other things.
    owned = [
        kafka_paths.home,
        kafka_paths.pid,
        kafka_paths.stdout_log,
        redis_paths.home,
        redis_paths.pid,
        redis_paths.log,
        *postgres.all_homes(layout),
        layout.apt_log,
    ]
    with _locked(layout, create=False):
        _stop_all(layout)
        for path in owned:
            _remove(path)
    _remove(layout.lock_path)
    for directory in (layout.run_dir, layout.fallback_dir):
        with contextlib.suppress(OSError):  # absent, or holding files that are not ours
            directory.rmdir()
    say("stack data deleted (the jar cache stays)")


def statuses(layout: Layout) -> list[ComponentStatus]:
    return [kafka.status(layout), *pg_cluster.statuses(layout), redis.status(layout)]


def render_status(layout: Layout) -> list[str]:
    lines = [f"run dir: {layout.run_dir}"]
    items = statuses(layout)
    width = max(len(item.name) for item in items) + 1  # "postgresql-b" is the longest name
    for item in items:
        pid = f"pid {item.pid}" if item.pid is not None else "no pid"
        lines.append(f"{item.name:<{width}} {item.state:<8}  {pid:<10}  {item.address}")
        lines.append(f"{'':<{width}} data {item.data_dir}")
        lines.append(f"{'':<{width}} log  {item.log}")
        if item.note:
            lines.append(f"{'':<{width}} note {item.note}")
    return [*lines, "", *env_lines()]
