"""The local stack's backup schedule, and its pgBackRest commands by hand.

``python -m tokvel_common.infra.backups schedule RUN_DIR`` is the scheduler: ``tokvel infra up``
starts it when the stack has backups (``TOKVEL_PG_BACKUPS=1``, see :mod:`pg_cluster`) and
``tokvel infra down`` stops it; its log is ``<pg home>/backup-scheduler.log``. Every
``TOKVEL_BACKUP_CHECK_SECONDS`` it reads ``pgbackrest info`` and, for each repository:

- a **full** backup when there is none or the newest is ``TOKVEL_BACKUP_FULL_INTERVAL_HOURS``
  (24) old — so also right after backups are first enabled;
- else an **incremental** when the newest backup is ``TOKVEL_BACKUP_INCR_INTERVAL_HOURS`` (1) old;
- the incrementals past ``TOKVEL_BACKUP_INCR_RETENTION_DAYS`` (7) expired (pgBackRest cannot
  express that rule itself: see :mod:`pgbackrest`); fulls expire by pgBackRest's own
  ``repo-retention-full`` (30 days) after each backup;
- ``pgbackrest verify`` after a full.

"Due when the newest is this old" rather than fixed clock times: a laptop that was asleep at
02:00 backs up when it wakes, as anacron would, and the scheduler keeps no state of its own —
the repositories are the state, so a restarted scheduler carries on where it was. We chose our
own process over cron because the machines this stack runs on (containers, CI, laptops) rarely
run a cron daemon; where one runs, these lines do the same job (with the scheduler not running):

    0 2 * * *  cd CHECKOUT && .venv/bin/python -m tokvel_common.infra.backups backup --type full
    0 * * * *  cd CHECKOUT && .venv/bin/python -m tokvel_common.infra.backups backup --type incr

By hand: ``python -m tokvel_common.infra.backups info|check|verify`` and
``backup --type full|incr [--repo 1|2]`` (both repositories when no ``--repo``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Literal

from tokvel_common.infra import pgbackrest
from tokvel_common.infra.layout import RUN_DIR_ENV, Layout
from tokvel_common.infra.pg_cluster import cluster_of
from tokvel_common.infra.pgbackrest import (
    REPOS,
    BackrestPaths,
    BackupInfo,
    BackupKind,
    BackupSettings,
)
from tokvel_common.infra.process import InfraError, say, stopwatch


@dataclass(frozen=True)
class Step:
    """One thing the scheduler does: a backup into a repository, or expiring a backup set."""

    action: Literal["backup", "expire"]
    repo: int
    kind: BackupKind | None = None  # of a backup
    label: str | None = None  # of the set to expire


def expired_incrementals(
    backups: Sequence[BackupInfo], now: datetime, retention: timedelta
) -> list[str]:
    """The first incremental of each chain whose newest incremental is older than ``retention``.

    A chain is the run of incrementals after one full (or differential): each depends on the
    one before, so expiring the first expires the chain, and only once all of it is old.
    """
    by_label = {b.label: b for b in backups}
    chains: dict[str, list[BackupInfo]] = {}
    for item in backups:
        if item.kind != "incr":
            continue
        head = item
        while head.prior in by_label and by_label[head.prior].kind == "incr":
            head = by_label[head.prior]
        chains.setdefault(head.label, []).append(item)
    cutoff = now - retention
    return [head for head, chain in chains.items() if max(b.stopped for b in chain) < cutoff]


def plan(backups: Sequence[BackupInfo], now: datetime, settings: BackupSettings) -> list[Step]:
    """What is due at ``now``, given every backup of every repository."""
    full_every = timedelta(hours=settings.tokvel_backup_full_interval_hours)
    incr_every = timedelta(hours=settings.tokvel_backup_incr_interval_hours)
    keep_incr = timedelta(days=settings.tokvel_backup_incr_retention_days)
    steps: list[Step] = []
    for repo in REPOS:
        mine = [b for b in backups if b.repo == repo]
        fulls = [b.started for b in mine if b.kind == "full"]
        if not fulls or now - max(fulls) >= full_every:
            steps.append(Step("backup", repo, kind="full"))
        elif now - max(b.started for b in mine) >= incr_every:
            steps.append(Step("backup", repo, kind="incr"))
        steps += [
            Step("expire", repo, label=label)
            for label in expired_incrementals(mine, now, keep_incr)
        ]
    return steps


def log(message: str) -> None:
    # The scheduler's stdout is its log file (spawn_detached); one stamped line per event.
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    sys.stdout.write(f"{stamp} {message}\n")
    sys.stdout.flush()


def tick(paths: BackrestPaths, settings: BackupSettings) -> None:
    """Do what is due now; a failed step is logged and retried at the next tick."""
    steps = plan(pgbackrest.backups(paths), datetime.now(UTC), settings)
    fulls = 0
    for step in steps:
        try:
            with stopwatch() as elapsed:
                if step.action == "backup":
                    assert step.kind is not None
                    pgbackrest.backup(paths, step.kind, step.repo)
                    fulls += step.kind == "full"
                else:
                    assert step.label is not None
                    pgbackrest.expire_set(paths, step.repo, step.label)
            what = step.kind or f"expire {step.label}"
            log(f"repo{step.repo}: {what} done in {elapsed():.1f}s")
        except InfraError as exc:
            log(f"repo{step.repo}: {step.action} failed: {exc}")
    if fulls:
        try:
            with stopwatch() as elapsed:
                pgbackrest.verify(paths)
            log(f"verify: both repositories valid ({elapsed():.1f}s)")
        except InfraError as exc:
            log(f"verify FAILED: {exc}")


class Scheduler:
    def __init__(self, paths: BackrestPaths, settings: BackupSettings) -> None:
        self.paths = paths
        self.settings = settings
        self.stopping = False

    def run(self) -> None:
        next_at = 0.0
        while not self.stopping:
            if time.monotonic() >= next_at:
                try:
                    tick(self.paths, self.settings)
                except InfraError as exc:  # `pgbackrest info` itself failed
                    log(f"cannot read the repositories: {exc}")
                next_at = time.monotonic() + self.settings.tokvel_backup_check_seconds
            time.sleep(1.0)  # short, so SIGTERM is seen promptly


def _schedule(run_dir: Path) -> int:
    paths = cluster_of(Layout.from_environment({RUN_DIR_ENV: str(run_dir)})).backrest
    scheduler = Scheduler(paths, BackupSettings())

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log(f"{signal.Signals(signum).name}: stopping")
        scheduler.stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    log(f"scheduling backups of {paths.root} ({scheduler.settings!r})")
    scheduler.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokvel_common.infra.backups", description=__doc__.splitlines()[0]
    )
    actions = parser.add_subparsers(dest="action", required=True)
    schedule = actions.add_parser("schedule", help="run the scheduler (tokvel infra up does)")
    schedule.add_argument("run_dir", type=Path)
    for name in ("info", "check", "verify"):
        actions.add_parser(name, help=f"pgbackrest {name}")
    backup = actions.add_parser("backup", help="a backup now, into one or both repositories")
    backup.add_argument("--type", choices=["full", "diff", "incr"], default="incr")
    backup.add_argument("--repo", type=int, choices=REPOS, action="append")
    args = parser.parse_args(argv)
    if args.action == "schedule":
        return _schedule(args.run_dir)
    paths = cluster_of(Layout.from_environment()).backrest
    if not paths.configured:
        sys.stderr.write("no backups in this run dir: TOKVEL_PG_BACKUPS=1 tokvel infra up\n")
        return 1
    try:
        if args.action == "info":
            say(pgbackrest.command(paths, ["info"], console="warn").rstrip())
        elif args.action == "check":
            say(pgbackrest.check(paths).rstrip())
        elif args.action == "verify":
            say(pgbackrest.verify(paths).rstrip())
        else:
            for repo in args.repo or REPOS:
                say(pgbackrest.backup(paths, args.type, repo, console="info").rstrip())
    except InfraError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
