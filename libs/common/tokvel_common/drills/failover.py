"""``make failover-drill``: kill -9 the primary under write load; the standby takes over.

1. The stack with a hot standby (``TOKVEL_PG_STANDBY=1``): synchronous streaming replication,
   and the watchdog (:mod:`tokvel_common.infra.pg_watchdog`).
2. Load: a fresh pipeline ingesting recorded data (its writer on the multi-host DATABASE_URL),
   plus ``--writers`` clients committing one row per transaction into a table of the drill's
   database; each remembers every commit PostgreSQL acknowledged.
3. After ``--load-seconds``: SIGKILL to the primary's postmaster.
4. Figures, all from the kill: the standby promoted (it answers ``pg_is_in_recovery() =
   false``), the first acknowledged write again (the clients reconnect by themselves through
   ``target_session_attrs=read-write``), the API serving a request only PostgreSQL can answer;
   acknowledged writes missing on the new primary (0: synchronous replication) — the clients'
   rows and the writer's samples below its committed Kafka offsets; and how long the watchdog
   took to rebuild the old primary as the new synchronous standby.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from tokvel_common.drills.common import (
    Drill,
    Figure,
    api_serves_from_postgres,
    close_drill,
    committed_offsets,
    eventually,
    open_drill,
    read_samples,
    report,
    rows_and_newest,
    stored_samples,
)
from tokvel_common.infra.pg_cluster import STANDBY_ENV, replication_state
from tokvel_common.infra.postgres import in_recovery, kill
from tokvel_common.infra.process import InfraError, say

PROMOTION_TARGET_SECONDS = 30.0
API_TARGET_SECONDS = 60.0
CREATE_TABLE = (
    "CREATE TABLE drill_acked_writes (id bigint PRIMARY KEY,"
    " written_at timestamptz NOT NULL DEFAULT clock_timestamp())"
)
INSERT = "INSERT INTO drill_acked_writes (id) VALUES ($1)"


@dataclass
class WriteLoad:
    """Clients committing one row per transaction; what was acknowledged, and when."""

    dsn: str
    clients: int
    acknowledged: set[int] = field(default_factory=set)
    failures: int = 0
    last_ack: float = 0.0  # monotonic
    stopping: bool = False

    async def client(self, first_id: int) -> None:
        next_id = first_id
        conn: asyncpg.Connection | None = None
        while not self.stopping:
            try:
                if conn is None:
                    conn = await asyncpg.connect(self.dsn, timeout=3)
                await conn.execute(INSERT, next_id, timeout=5)
                self.acknowledged.add(next_id)
                self.last_ack = time.monotonic()
            except (
                OSError,
                TimeoutError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                # A timed-out statement leaves the connection busy with its cancellation.
                asyncpg.InternalClientError,
            ):
                # Unacknowledged: maybe committed, maybe not. Not counted, never retried.
                self.failures += 1
                if conn is not None:
                    conn.terminate()
                    conn = None
                await asyncio.sleep(0.05)
            next_id += self.clients
        if conn is not None:
            await conn.close()

    async def first_ack_after(self, moment: float, within: float) -> float:
        async def acked() -> bool:
            return self.last_ack > moment

        await eventually(acked, what="a write acknowledged again", within=within, interval=0.02)
        return self.last_ack - moment


async def _prepare_table(drill: Drill) -> None:
    conn = await asyncpg.connect(drill.cluster.primary().dsn(drill.database), timeout=30)
    try:
        await conn.execute(CREATE_TABLE)
    finally:
        await conn.close()


async def _rows_present(dsn: str, ids: set[int]) -> set[int]:
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        rows = await conn.fetch("SELECT id FROM drill_acked_writes")
    finally:
        await conn.close()
    return {int(r["id"]) for r in rows} & ids


async def _drill(drill: Drill, args: argparse.Namespace) -> list[Figure]:
    cluster = drill.cluster
    old, new = cluster.primary(), cluster.replica()
    if new is None:
        raise InfraError("the stack has no standby (TOKVEL_PG_STANDBY=1 tokvel infra up)")
    await _prepare_table(drill)

    async def first_rows() -> int | None:
        answer = await rows_and_newest(drill.database_url)
        return answer[2] if answer is not None and answer[0] > 0 else None

    say("== ingesting recorded data, and write load")
    cmc_id = await eventually(first_rows, what="the first rows", within=300)
    load = WriteLoad(drill.database_url, args.writers)
    clients = [asyncio.create_task(load.client(i)) for i in range(1, args.writers + 1)]
    try:
        await asyncio.sleep(args.load_seconds)
        replication = await replication_state(old)
        before = len(load.acknowledged)
        say(f"   {before} writes acknowledged, replication {replication}")

        say(f"== kill -9 {old.name} (the primary)")
        killed_at = time.monotonic()
        pid = kill(old)
        say(f"   SIGKILL pid {pid}")

        async def promoted() -> bool:
            return await in_recovery(new, wait_seconds=1) is False

        await eventually(promoted, what=f"{new.name} promoted", within=120, interval=0.05)
        promotion = time.monotonic() - killed_at
        say(f"   {new.name} is the primary {promotion:.2f}s after the kill")
        writes_back = await load.first_ack_after(killed_at, within=120)

        async def api_back() -> bool:
            return await asyncio.to_thread(api_serves_from_postgres, drill, cmc_id)

        await eventually(api_back, what="the API on the new primary", within=300, interval=0.1)
        api = time.monotonic() - killed_at
        say(f"   API serving from PostgreSQL {api:.2f}s after the kill")
        # The writer's acknowledgements: its offsets, committed only after PostgreSQL did.
        await asyncio.sleep(2)
        writer_end = await committed_offsets(drill.bootstrap, drill.writer_group, drill.topics)
        await asyncio.sleep(args.after_seconds)
    finally:
        load.stopping = True
        await asyncio.gather(*clients)

    present = await _rows_present(new.dsn(drill.database), load.acknowledged)
    lost_writes = len(load.acknowledged) - len(present)
    metrics_end = {tp: o for tp, o in writer_end.items() if tp.topic == drill.metrics_topic}
    samples = await read_samples(drill.bootstrap, {}, metrics_end)
    lost_samples = len(samples - await stored_samples(new.dsn(drill.database)))

    say(f"== waiting for the watchdog to rebuild {old.name} as the new standby")

    async def synchronous_again() -> bool:
        return (await replication_state(new) or "").endswith("/sync")

    await eventually(synchronous_again, what="a synchronous standby again", within=900)
    rebuilt = time.monotonic() - killed_at
    return [
        Figure(
            "kill -9 -> standby promoted (writable)",
            f"{promotion:.2f} s",
            f"<= {PROMOTION_TARGET_SECONDS:g} s",
            promotion <= PROMOTION_TARGET_SECONDS,
        ),
        Figure("kill -9 -> first write acknowledged again", f"{writes_back:.2f} s", "-", True),
        Figure(
            "kill -9 -> API serving from PostgreSQL",
            f"{api:.2f} s",
            f"<= {API_TARGET_SECONDS:g} s",
            api <= API_TARGET_SECONDS,
        ),
        Figure(
            "replication at the kill",
            str(replication),
            "streaming/sync",
            replication == "streaming/sync",
        ),
        Figure(
            "acknowledged writes lost (clients)",
            f"{lost_writes} of {len(load.acknowledged)}",
            "0",
            lost_writes == 0,
        ),
        Figure(
            "acknowledged samples lost (writer)",
            f"{lost_samples} of {len(samples)}",
            "0",
            lost_samples == 0,
        ),
        Figure("unacknowledged attempts (errors)", str(load.failures), "-", True),
        Figure("kill -9 -> old primary back as sync standby", f"{rebuilt:.1f} s", "-", True),
    ]


def run(args: argparse.Namespace) -> int:
    drill = open_drill("failover", {STANDBY_ENV: "1"})
    code = 1
    try:
        figures = asyncio.run(_drill(drill, args))
        code = report(f"failover drill {drill.stamp}", figures, args.json)
    finally:
        close_drill(drill, succeeded=code == 0)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokvel_common.drills.failover", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--after-seconds", type=float, default=10.0)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except InfraError as exc:
        sys.stderr.write(f"failover drill: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
