"""The plans (the full suite, the quick one), the command line, the run and its report."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.chaos.environment import DEFAULT_PORT_BASE, PORT_BASE_ENV
from tests.chaos.faults import (
    KafkaRestart,
    KillServices,
    NetworkFault,
    PostgresOutage,
    RedisOutage,
    RedisRestart,
    Step,
    kill_figures,
    start_again,
)
from tests.chaos.stack import ChaosError, ChaosPorts, Replayed, log, running_stack
from tests.chaos.verify import check, wait_for_the_end
from tests.support.recorded import recorded_rows
from tokvel_common.drills.common import Figure, report
from tokvel_common.infra import kafka, redis
from tokvel_common.infra import stack as infra
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.pg_cluster import cluster_of
from tokvel_common.paths import DEFAULT_REPLAY_DATA


@dataclass(frozen=True)
class Plan:
    title: str
    snapshots: int | None  # None: the whole recording
    poll_seconds: float
    steps: tuple[tuple[str, Step], ...]  # (name on the command line, step), in order


FULL = Plan(
    "chaos suite",
    snapshots=None,  # the whole recorded week: 2 016 snapshots
    # One snapshot per 0.3 s: the replay lasts about as long as the faults do (its polls stall
    # during some of them), so every fault hits a moving pipeline.
    poll_seconds=0.3,
    steps=(
        ("kill-1", KillServices(label="kill -9 every service (1)")),
        ("redis", RedisOutage(60)),
        ("redis-restart", RedisRestart()),
        ("kafka-1", KafkaRestart(signal.SIGTERM)),
        (
            "postgres",
            PostgresOutage(300, meanwhile=KillServices(label="kill -9 every service (2)")),
        ),
        ("net-postgres", NetworkFault("postgres", 45)),
        ("net-redis", NetworkFault("redis", 20)),
        ("kafka-2", KafkaRestart(signal.SIGKILL)),
        ("kill-3", KillServices(label="kill -9 every service (3)")),
    ),
)
QUICK = Plan(
    "chaos suite, short version",
    snapshots=150,  # 12 h 25 min of the week: the 12 h window drops its first samples
    poll_seconds=0.25,
    steps=(
        ("kill-writer", KillServices(("writer",), "kill -9 the writer")),
        ("redis", RedisOutage(15)),
    ),
)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Faults against the whole stack on a private local stack, during a replay "
        "of recorded data; prints a table of figures, exit 1 when one misses its target.",
    )
    parser.add_argument("--quick", action="store_true", help="the short version (CI)")
    parser.add_argument(
        "--steps",
        help="comma-separated steps of the plan to run, in plan order (default: all): "
        + "; ".join(f"{p.title}: {', '.join(n for n, _ in p.steps)}" for p in (FULL, QUICK)),
    )
    parser.add_argument(
        "--snapshots", type=int, help="replay only this many snapshots (default: the plan's)"
    )
    parser.add_argument(
        "--poll", type=float, help="seconds between two snapshots (default: the plan's)"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args(argv)


def _steps(plan: Plan, wanted: str | None) -> list[tuple[str, Step]]:
    if wanted is None:
        return list(plan.steps)
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = set(names) - {name for name, _ in plan.steps}
    if unknown:
        raise SystemExit(
            f"unknown steps {sorted(unknown)}; {plan.title} has "
            f"{', '.join(n for n, _ in plan.steps)}"
        )
    return [(name, step) for name, step in plan.steps if name in names]


def count_snapshots(recording: Path) -> int:
    count, last = 0, None
    for row in recorded_rows(recording, "", "~"):
        if row["ts"] != last:
            count, last = count + 1, row["ts"]
    return count


def _infra_running(layout: Layout) -> bool:
    return all(status.pid is not None for status in infra.statuses(layout))


async def _run(plan: Plan, steps: list[tuple[str, Step]]) -> list[Figure]:
    layout = Layout.from_environment()
    if cluster_of(layout).standby:
        raise ChaosError(
            f"{layout.run_dir} has a PostgreSQL standby: its watchdog would fail over when the "
            "suite stops PostgreSQL; run the suite on a stack without one"
        )
    recording = Path(os.environ.get("TOKVEL_REPLAY_DATA") or DEFAULT_REPLAY_DATA)
    snapshots = plan.snapshots
    if snapshots is None:
        snapshots = await asyncio.to_thread(count_snapshots, recording)
    replayed = Replayed(recording, snapshots, plan.poll_seconds)
    ports = ChaosPorts(int(os.environ.get(PORT_BASE_ENV) or DEFAULT_PORT_BASE))
    ours = not _infra_running(layout)
    figures: list[Figure] = []
    try:
        if ours:
            log(f"starting the private stack in {layout.run_dir}")
            logs = [
                kafka.locate(layout).stdout_log,
                redis.locate(layout).log,
                *(node.log for node in cluster_of(layout).nodes),
            ]
            await start_again(lambda: infra.up(layout), logs, "the private stack")
        async with running_stack(layout, ports, replayed, {}) as chaos:
            try:
                for name, step in steps:
                    log(f"== {name}: {step.name}")
                    figures += await step.run(chaos)
            finally:
                figures += kill_figures(chaos)
            await wait_for_the_end(chaos)
            await chaos.load.stop()
            figures += await check(chaos)
    except (Exception, asyncio.CancelledError) as exc:  # reported with the figures so far
        traceback.print_exc()
        figures.append(Figure("the suite ran to its end", f"no: {exc!r}"[:120], "yes", False))
    finally:
        if ours:
            log("stopping the private stack the suite started")
            await asyncio.to_thread(infra.down, layout)
    return figures


def main(argv: Sequence[str]) -> int:
    args = _parse(argv)
    # The probes' Kafka clients complain on every retry while the broker is away on purpose.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    plan = QUICK if args.quick else FULL
    if args.snapshots is not None:
        plan = dataclasses.replace(plan, snapshots=args.snapshots)
    if args.poll is not None:
        plan = dataclasses.replace(plan, poll_seconds=args.poll)
    steps = _steps(plan, args.steps)
    started = time.monotonic()
    figures = asyncio.run(_run(plan, steps))
    elapsed = time.monotonic() - started
    title = f"{plan.title} ({', '.join(n for n, _ in steps)}) in {elapsed:.0f} s"
    return report(title, figures, args.json)
