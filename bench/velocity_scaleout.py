"""Scale-out of the velocity processor: two workers against one, on the same backlog.

    .venv/bin/python bench/velocity_scaleout.py [--quotes 150000] [--rounds 2]
                                                [--time-limit 300] [--json PATH]

Each round runs, one after the other and alternating which goes first, one worker and then two
workers (one consumer group: ``cmc.quotes.raw``'s 6 partitions split 3/3) on the same backlog of
``--quotes`` recorded quotes, each run on topics of its own (the same quotes, so the same
partitions). Both are measured as in bench/velocity_throughput.py (same code): quotes/s over
the span from the first poll at which every worker has consumed something (the group has
settled) to the end of the backlog. The figure is the best two-worker rate over the best
one-worker rate; target 1.6x.

What limits it is in ``detail``, per run: CPU seconds of the workers and of the local broker
per second of the span (``cores_busy``: 2.0 is every core of a 2-core machine), the quotes each
worker consumed in the span (partitions carry unequal numbers of tokens, so an even split of
partitions is not an even split of the work), and the backlog per partition.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import say, scratch_topics
from bench.report import Figure, write_figures
from bench.velocity_throughput import WorkersRun, publish_backlog, run_workers
from tokvel_common.settings import CommonSettings

TARGET = 1.6
TARGET_TEXT = "≥1.6×"  # noqa: RUF001 - the target as the issue writes it


@dataclass(frozen=True)
class Run:
    workers: int
    per_partition: dict[int, int]
    result: WorkersRun

    def describe(self) -> str:
        rate = self.result.rate
        line = f"{self.workers} worker(s): {rate.describe()}, {self.cores_busy():.2f} cores busy"
        if self.workers > 1:
            line += f", quotes per worker {self.result.consumed}"
        return line

    def cores_busy(self) -> float:
        """Workers' and broker's CPU seconds per second of the span."""
        rate = self.result.rate
        return (rate.cpu_seconds + (rate.broker_cpu_seconds or 0.0)) / rate.seconds

    def as_detail(self) -> dict[str, Any]:
        rate = self.result.rate
        return {
            "workers": self.workers,
            **self.result.rate.as_detail(),
            "cores_busy": self.cores_busy(),
            "workers_cpu_per_second": rate.cpu_seconds / rate.seconds,
            "broker_cpu_per_second": (
                None if rate.broker_cpu_seconds is None else rate.broker_cpu_seconds / rate.seconds
            ),
            "consumed_per_worker": self.result.consumed,
            "backlog_per_partition": self.per_partition,
        }


async def measure(
    settings: CommonSettings, args: argparse.Namespace, workers: int, logs: Path
) -> Run:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers}
    async with scratch_topics(settings.kafka_bootstrap_servers, f"scaleout{workers}") as prefix:
        per_partition = await publish_backlog(settings, prefix, args.quotes)
        backlog = sum(per_partition.values())
        run_logs = logs / f"{prefix}{workers}"
        run_logs.mkdir()
        result = await run_workers(env, prefix, workers, backlog, args.time_limit, run_logs)
        return Run(workers, per_partition, result)


async def run(args: argparse.Namespace) -> list[Figure]:
    settings = CommonSettings()
    runs: dict[int, list[Run]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="velocity-scaleout-logs-") as logs:
        for number in range(1, args.rounds + 1):
            for workers in (1, 2) if number % 2 else (2, 1):
                measured = await measure(settings, args, workers, Path(logs))
                runs[workers].append(measured)
                say(f"round {number}: {measured.describe()}")
    one = max(runs[1], key=lambda r: r.result.rate.per_second)
    two = max(runs[2], key=lambda r: r.result.rate.per_second)
    ratio = two.result.rate.per_second / one.result.rate.per_second
    say(
        f"two workers / one: {ratio:.2f}x (target {TARGET}x); "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    detail = {
        "cores": os.cpu_count(),
        "best_one": one.as_detail(),
        "best_two": two.as_detail(),
        "runs": [r.as_detail() for workers in (1, 2) for r in runs[workers]],
        "data": settings.tokvel_replay_data.name,
    }
    return [
        Figure(
            "velocity scale-out (two workers / one)", "quotes/s", two.result.rate.per_second,
            TARGET_TEXT, ratio >= TARGET,
            baseline=one.result.rate.per_second, baseline_name="one velocity worker",
            ratio=ratio, detail=detail,
        )
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quotes", type=int, default=150_000, help="backlog (default 150000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both runs (default 2)")
    parser.add_argument(
        "--time-limit", type=float, default=300.0, help="seconds per run (default 300)"
    )
    parser.add_argument("--json", type=Path, help="write the figures there (bench/report.py)")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    if args.json is not None:
        write_figures(args.json, figures)


if __name__ == "__main__":
    main()
