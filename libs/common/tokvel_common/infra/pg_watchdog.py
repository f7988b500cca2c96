"""The failover watchdog of the local stack: promotes the standby when the primary dies.

``tokvel infra up`` starts it (``python -m tokvel_common.infra.pg_watchdog RUN_DIR``) when the
stack has a hot standby, ``tokvel infra down`` stops it before the nodes. Every
``TOKVEL_PG_WATCHDOG_INTERVAL_SECONDS`` it looks at the primary:

- its postmaster is gone (``kill -9``, a crash): a failover now — on one machine the process
  table is proof, no quorum is needed;
- it runs but has not answered a query for ``TOKVEL_PG_WATCHDOG_UNRESPONSIVE_SECONDS``: it is
  fenced (SIGKILL) and then the same failover, so there are never two primaries.

A failover promotes the standby (``pg_ctl promote``) and records it in ``roles.json``; the
services, on the multi-host ``DATABASE_URL``, find the new primary on their next connection.
Replication being synchronous, every write acknowledged by the old primary is on the new one.
Between failovers the watchdog keeps a standby: it restarts a stopped one, and rebuilds the
former primary (or a node without data) as a fresh copy of the new primary, after which the
primary waits for it again. One line per event goes to its log (``<pg home>/watchdog.log``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokvel_common.infra.layout import RUN_DIR_ENV, Layout
from tokvel_common.infra.pg_cluster import (
    PgCluster,
    cluster_of,
    ensure_replica,
    fail_over,
    keeper_lock,
    replication_state,
)
from tokvel_common.infra.postgres import in_recovery, running_pid
from tokvel_common.infra.process import InfraError

REPLICA_TIMEOUT_SECONDS = 600.0


class WatchdogSettings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    tokvel_pg_watchdog_interval_seconds: float = Field(
        default=0.5, gt=0, description="How often the primary is looked at."
    )
    tokvel_pg_watchdog_unresponsive_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A primary that runs but answers no query this long is fenced and replaced.",
    )
    tokvel_pg_watchdog_probe_timeout_seconds: float = Field(
        default=2.0, gt=0, description="Longest wait for one probe query."
    )


def log(message: str) -> None:
    # The watchdog's stdout is its log file (spawn_detached); one stamped line per event.
    stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
    sys.stdout.write(f"{stamp} {message}\n")
    sys.stdout.flush()


@dataclass
class Watchdog:
    """Driven by :meth:`step` (a test calls it directly; :meth:`run` loops)."""

    cluster: PgCluster
    settings: WatchdogSettings
    unanswered_since: float | None = None
    last_replication: str | None = None
    stuck: str | None = None  # why a failover cannot happen, as last logged
    stopping: bool = False

    def step(self) -> None:
        with keeper_lock(self.cluster):
            primary, replica = self.cluster.primary(), self.cluster.replica()
            if replica is None:
                return
            if running_pid(primary) is None:
                self._fail_over(f"{primary.name}: postmaster gone")
                return
            timeout = self.settings.tokvel_pg_watchdog_probe_timeout_seconds
            answer = asyncio.run(in_recovery(primary, wait_seconds=timeout))
            now = time.monotonic()
            if answer is None:
                self.unanswered_since = self.unanswered_since or now
                silent = now - self.unanswered_since
                if silent >= self.settings.tokvel_pg_watchdog_unresponsive_seconds:
                    self._fail_over(f"{primary.name}: no answer for {silent:.1f}s, fenced")
                return
            self.unanswered_since = None
            self._keep_standby()

    def _fail_over(self, reason: str) -> None:
        old, new = self.cluster.primary(), self.cluster.replica()
        assert new is not None  # step() checked
        if running_pid(new) is None or not new.is_standby:
            stuck = f"{reason}; no standby to promote ({new.name} is not following): waiting"
            if stuck != self.stuck:  # once, not every interval
                log(stuck)
                self.stuck = stuck
            return
        self.stuck = None
        detected = time.time()
        log(f"{reason}; promoting {new.name} (replication was {self.last_replication})")
        fail_over(self.cluster, old, new)
        promoted = time.time()
        self.unanswered_since = None
        self.last_replication = None
        log(f"{new.name} promoted: primary on {new.address} ({promoted - detected:.3f}s)")

    def _keep_standby(self) -> None:
        primary, replica = self.cluster.primary(), self.cluster.replica()
        assert replica is not None
        state = asyncio.run(replication_state(primary))
        if state != self.last_replication:
            log(f"replication {primary.name} -> {replica.name}: {state}")
            self.last_replication = state
        if state is not None and state.endswith("/sync"):
            return
        if replica.is_standby and running_pid(replica) is not None:
            return  # connecting or catching up: give it time
        log(f"{replica.name}: not following {primary.name}; bringing it back")
        done = ensure_replica(self.cluster, primary, replica, timeout=REPLICA_TIMEOUT_SECONDS)
        log(f"{replica.name}: {done}, synchronous standby again")

    def run(self) -> None:
        interval = self.settings.tokvel_pg_watchdog_interval_seconds
        while not self.stopping:
            try:
                self.step()
            except (InfraError, OSError) as exc:
                log(f"error: {exc}")
            time.sleep(interval)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokvel_common.infra.pg_watchdog", description=__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", type=Path, help="the stack's run dir (TOKVEL_RUN_DIR)")
    args = parser.parse_args(argv)
    cluster = cluster_of(Layout.from_environment({RUN_DIR_ENV: str(args.run_dir)}))
    watchdog = Watchdog(cluster, WatchdogSettings())

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log(f"{signal.Signals(signum).name}: stopping")
        watchdog.stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    replica = cluster.replica()
    log(f"watching {cluster.primary().name}; standby {replica.name if replica else None}")
    watchdog.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
