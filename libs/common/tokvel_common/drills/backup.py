"""``make backup-drill``: lose PostgreSQL's data and restore it from the second repository alone.

1. The stack with backups on (``TOKVEL_PG_BACKUPS=1``): WAL archived into repo1 and repo2, the
   scheduler's first full backups.
2. A fresh pipeline (replay -> ingestor -> velocity -> writer, recorded real data) ingests for
   ``--ingest-seconds``; an incremental backup goes into each repository; ingestion goes on for
   ``--tail-seconds`` (longer than ``archive_timeout``, 60 s), so the newest rows exist only in
   WAL: archived (restored by replaying it) or not yet (lost: the RPO).
3. Disaster: the scheduler and watchdog stopped, every PostgreSQL node killed (SIGKILL) and its
   data dir deleted. The services keep running.
4. Recovery: repo1 taken offline (renamed), ``pgbackrest restore --repo=2`` of the newest backup
   and replay of repo2's WAL to its end; the node comes back as the primary; repo1 back online.
   **RTO** runs from the wipe until the gateway answers a request only PostgreSQL can answer.
5. **RPO** before any replay: the newest acknowledged write (the newest ``created_at`` the drill
   saw committed before the kill) minus the newest restored one; and the acknowledged samples
   missing from the restore.
6. Replay from Kafka. The writer's consumer offsets live in Kafka, not in PostgreSQL: they are
   past what the restore holds, so the main writer will never read the gap again by itself. A
   second writer, in a consumer group of its own, starts at the offsets whose record time is the
   newest restored row's ``created_at`` minus ``--replay-margin-seconds`` and stops once past the
   main group's offsets at the kill. Why that start is enough: a message missing from the
   restore was written after the restore point, and produced before it was written by at most
   the writer's lag (the margin must exceed it; the 0-lost check below would show it did not).
   Why a second group rather than rewinding the main one: the main writer keeps running (no
   restart, no rebalance); writes are idempotent (``ON CONFLICT DO NOTHING``), so the overlap
   costs nothing.
7. **0 lost**: every acknowledged sample — each ``token.metrics`` message below the main writer
   group's committed offsets at the kill — is a row again.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from tokvel_common.drills.common import (
    Drill,
    Figure,
    Offsets,
    api_serves_from_postgres,
    close_drill,
    committed_offsets,
    eventually,
    now,
    offsets_at,
    open_drill,
    read_samples,
    report,
    rows_and_newest,
    seed_group,
    start_replay_writer,
    stored_samples,
)
from tokvel_common.infra import pg_cluster, pgbackrest
from tokvel_common.infra.pg_cluster import BACKUPS_ENV, settings_for, stop_daemon
from tokvel_common.infra.postgres import kill, start, wait_writable
from tokvel_common.infra.process import InfraError, say, stopwatch, terminate

RTO_TARGET_SECONDS = 15 * 60  # the seed's promises
RPO_TARGET_SECONDS = 5 * 60
RESTORE_REPO = 2


@dataclass
class Watch:
    """What the drill saw committed: rows, the newest write, a token to ask the API about."""

    rows: int = 0
    newest: datetime | None = None
    cmc_id: int | None = None


async def watch(drill: Drill, seconds: float, seen: Watch) -> Watch:
    """Poll the table for ``seconds``; the last answer is within 0.2 s of the end."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        answer = await rows_and_newest(drill.database_url)
        if answer is not None:
            seen.rows, seen.newest, cmc_id = answer
            seen.cmc_id = seen.cmc_id or cmc_id
        await asyncio.sleep(0.2)
    return seen


def take_backups(drill: Drill) -> datetime:
    """The scheduler's fulls, then an incremental into each repository; when repo2's ended."""
    paths = drill.cluster.backrest

    def fulls_in_both() -> bool:
        return {b.repo for b in pgbackrest.backups(paths) if b.kind == "full"} >= {1, 2}

    say("== waiting for the scheduler's full backups in repo1 and repo2")
    deadline = time.monotonic() + 600
    while not fulls_in_both():
        if time.monotonic() > deadline:
            raise InfraError("no full backup in both repositories after 600s (scheduler log?)")
        time.sleep(2)
    for repo in pgbackrest.REPOS:
        with stopwatch() as elapsed:
            pgbackrest.backup(paths, "incr", repo)
        say(f"   incremental backup into repo{repo} in {elapsed():.1f}s")
    backups = pgbackrest.backups(paths)
    for item in backups:
        say(f"   repo{item.repo} {item.kind:<4} {item.label}  {item.stopped:%H:%M:%S}")
    return max(b.stopped for b in backups if b.repo == RESTORE_REPO)


def lose_everything(drill: Drill) -> tuple[datetime, float]:
    """Stop the helpers, SIGKILL every node, delete the data dirs; kill and wipe times."""
    cluster = drill.cluster
    for daemon in (cluster.watchdog, cluster.scheduler):
        stop_daemon(daemon)
    for node in cluster.nodes:
        pid = kill(node)
        say(f"   {node.name}: SIGKILL pid {pid}")
    killed_at = now()
    wiped_at = time.monotonic()
    for node in cluster.nodes:
        shutil.rmtree(node.data, ignore_errors=True)
        say(f"   {node.name}: deleted {node.data}")
    return killed_at, wiped_at


def restore_from_second_repo(drill: Drill) -> tuple[float, float]:
    """Restore with repo1 offline; seconds of pgbackrest restore, and of recovery to writable."""
    cluster = drill.cluster
    paths, primary = cluster.backrest, cluster.primary()
    online = paths.repo(1)
    offline = online.with_name("repo1.offline")
    online.rename(offline)
    say(f"   repo1 offline ({offline}): restoring from repo{RESTORE_REPO} alone")
    try:
        with stopwatch() as restore_time:
            pgbackrest.restore(paths, primary, RESTORE_REPO)
        restored_in = restore_time()
        with stopwatch() as recovery_time:
            start(primary, settings_for(cluster, primary, follow=None, sync=False))
            wait_writable(primary, 1800)
        recovered_in = recovery_time()
    finally:
        offline.rename(online)
    say(f"   restored in {restored_in:.1f}s, WAL replayed and writable in {recovered_in:.1f}s")
    return restored_in, recovered_in


async def replay(drill: Drill, since: datetime, until: Offsets) -> float:
    """Re-read the gap with a second writer; seconds until it passed ``until``."""
    group = f"{drill.writer_group}-replay"
    start_offsets = await offsets_at(drill.bootstrap, drill.topics, since)
    await seed_group(drill.bootstrap, group, start_offsets)
    gap = sum(max(0, until.get(tp, 0) - offset) for tp, offset in start_offsets.items())
    say(f"   replay group {group}: {gap} messages to re-read, from record time {since:%H:%M:%S}")
    log_path = drill.layout.run_dir / "services" / "writer-replay.log"
    with stopwatch() as elapsed:
        writer = start_replay_writer(drill, group, log_path)
        try:

            async def passed() -> bool:
                done = await committed_offsets(drill.bootstrap, group, drill.topics)
                return all(done.get(tp, 0) >= offset for tp, offset in until.items())

            await eventually(passed, what="the replay writer", within=900, interval=1.0)
        finally:
            terminate(writer.pid, name="replay writer", timeout=30)
            writer.wait(timeout=10)
        return elapsed()


def exercise(drill: Drill, args: argparse.Namespace) -> list[Figure]:
    seen = Watch()
    say("== ingesting recorded data")

    async def first_rows() -> bool:
        answer = await rows_and_newest(drill.database_url)
        return answer is not None and answer[0] > 0

    asyncio.run(eventually(first_rows, what="the first rows", within=300))
    asyncio.run(watch(drill, args.ingest_seconds, seen))
    say(f"   {seen.rows} rows")
    backup_end = take_backups(drill)
    say(f"== ingesting {args.tail_seconds:g}s more (only in WAL from here)")
    asyncio.run(watch(drill, args.tail_seconds, seen))
    newest_acknowledged, rows_acknowledged = seen.newest, seen.rows
    assert newest_acknowledged is not None and seen.cmc_id is not None

    say("== disaster: PostgreSQL killed, its data deleted")
    killed_at, wiped_at = lose_everything(drill)
    # A commit in flight at the kill may land a moment later: read the offsets after it.
    time.sleep(2)
    acknowledged_end = asyncio.run(
        committed_offsets(drill.bootstrap, drill.writer_group, drill.topics)
    )
    say("== recovery")
    restored_in, recovered_in = restore_from_second_repo(drill)

    async def api_back() -> bool:
        assert seen.cmc_id is not None
        return await asyncio.to_thread(api_serves_from_postgres, drill, seen.cmc_id)

    asyncio.run(
        eventually(api_back, what="the API on the restored database", within=900, interval=0.2)
    )
    rto = time.monotonic() - wiped_at
    say(f"   API serving from PostgreSQL again {rto:.1f}s after the wipe")
    # The main writer writes again from here (new rows, newer than the kill): the restore is
    # what was written before the kill. Its gaps stay gaps until the replay below.
    restored = asyncio.run(rows_and_newest(drill.database_url, before=killed_at))
    if restored is None:
        raise InfraError("the restored database answers no query on token_metrics")
    rows_restored, newest_restored, _ = restored
    if newest_restored is None:
        raise InfraError("the restore holds no token_metrics row at all")
    metrics_end = {tp: o for tp, o in acknowledged_end.items() if tp.topic == drill.metrics_topic}
    acknowledged = asyncio.run(read_samples(drill.bootstrap, {}, metrics_end))
    missing_after_restore = len(acknowledged - asyncio.run(stored_samples(drill.database_url)))
    say("== the rest of the stack back (standby if any, scheduler)")
    pg_cluster.up(drill.layout)

    say("== replaying from Kafka what the restore lacks")
    margin = timedelta(seconds=args.replay_margin_seconds)
    replay_seconds = asyncio.run(replay(drill, newest_restored - margin, acknowledged_end))
    lost = len(acknowledged - asyncio.run(stored_samples(drill.database_url)))
    rpo = (newest_acknowledged - newest_restored).total_seconds()
    # Restored writes newer than the backup came from repo2's WAL archive, not the backup.
    past_backup = (newest_restored - backup_end).total_seconds()
    figures = [
        Figure(
            "RTO: wipe -> API serving from PostgreSQL",
            f"{rto:.1f} s",
            f"<= {RTO_TARGET_SECONDS} s",
            rto <= RTO_TARGET_SECONDS,
        ),
        Figure("  pgbackrest restore (repo2 only)", f"{restored_in:.1f} s", "-", True),
        Figure("  WAL replay until writable", f"{recovered_in:.1f} s", "-", True),
        Figure(
            "  restored writes past the newest repo2 backup (WAL)",
            f"{past_backup:.1f} s",
            "> 0",
            past_backup > 0,
        ),
        Figure(
            "RPO: newest acknowledged - newest restored write",
            f"{rpo:.1f} s",
            f"<= {RPO_TARGET_SECONDS} s",
            rpo <= RPO_TARGET_SECONDS,
        ),
        Figure(
            "rows before the kill / restored", f"{rows_acknowledged} / {rows_restored}", "-", True
        ),
        Figure(
            "acknowledged samples missing after restore",
            f"{missing_after_restore} of {len(acknowledged)}",
            "-",
            True,
        ),
        Figure("replay from Kafka", f"{replay_seconds:.1f} s", "-", True),
        Figure("acknowledged samples lost after replay", str(lost), "0", lost == 0),
    ]
    return figures


def run(args: argparse.Namespace) -> int:
    drill = open_drill("backup", {BACKUPS_ENV: "1"})
    code = 1
    try:
        code = report(f"backup drill {drill.stamp}", exercise(drill, args), args.json)
    finally:
        close_drill(drill, succeeded=code == 0)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokvel_common.drills.backup", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--ingest-seconds", type=float, default=60.0, help="ingestion before the backups"
    )
    parser.add_argument(
        "--tail-seconds",
        type=float,
        default=90.0,
        help="ingestion after them; more than archive_timeout (60 s), or no WAL is archived",
    )
    parser.add_argument(
        "--replay-margin-seconds",
        type=float,
        default=120.0,
        help="replay from this long before the newest restored write (more than writer lag)",
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InfraError as exc:
        sys.stderr.write(f"backup drill: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
