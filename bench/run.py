"""``make bench``: every benchmark with its baseline, in one run: one table, one JSON file.

    .venv/bin/python bench/run.py [--only NAME ...] [--skip NAME ...] [--quick]
                                  [--compare OLD.json]
    .venv/bin/python bench/run.py --compare OLD.json NEW.json   # no run: the deltas only
    .venv/bin/python bench/run.py --list

Each benchmark script runs as a subprocess of its own, one after the other (they would
otherwise measure each other), with ``--json PATH`` so that it writes its figures
(``bench/report.py``); its output is shown as it comes, indented. Each is bounded in time: past
its limit it is interrupted (SIGINT, so that it removes what it created), then killed with
everything it started. A script that fails, times out or writes no figures is a failed row of
the table, and the run goes on.

The table has one row per figure: tokvel's value, the baseline's from the same run, their
ratio, the target and whether it is met. Everything (figures, each script's status, output
tail and seconds, the machine and its load average before and after) is written to
``bench/results/<UTC time>.json``; ``--compare OLD.json`` prints, after the run, the change of
every figure against that earlier file. Exit status: 0 when every benchmark ran (whatever the
targets say), 1 when one failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import deque
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Figure, machine, read_figures

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
INTERRUPT_GRACE_SECONDS = 60.0
OUTPUT_TAIL_LINES = 30


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    what: str
    timeout_seconds: float
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()  # --quick: smaller and shorter, same figures


BENCHMARKS = (
    Benchmark(
        "writer", "writer_throughput.py",
        "writer rows/s vs raw asyncpg copy_records_to_table into the same table",
        900, quick_args=("--samples", "80000"),
    ),
    Benchmark(
        "gateway", "gateway_latency.py",
        "gateway cached GET /v1/tokens/{id} req/s and p99 @ 64 conns vs bare aiohttp + redis GET",
        900, quick_args=("--seconds", "3", "--rounds", "1"),
    ),
    Benchmark(
        "velocity", "velocity_throughput.py",
        "one velocity worker quotes/s vs a bare Faust agent iterating the same topic",
        1200, quick_args=("--quotes", "20000", "--rounds", "1"),
    ),
    Benchmark(
        "velocity-scaleout", "velocity_scaleout.py",
        "two velocity workers vs one on the same backlog",
        1500, quick_args=("--quotes", "40000", "--rounds", "1"),
    ),
    Benchmark(
        "pipeline", "pipeline.py",
        "recorded week raw -> PostgreSQL: whole pipeline vs plain aiokafka into the writer's code",
        2400, quick_args=("--samples", "50000"),
    ),
    Benchmark(
        "ws", "ws_fanout.py",
        "freshness raw -> WS client @ 1 000 subscribers; fan-out to 5 000 sockets vs bare aiohttp",
        1500, quick_args=("--duration", "5", "--drain", "3", "--fanout-rounds", "1"),
    ),
    Benchmark(
        "velocity-memory", "velocity_state_memory.py",
        "velocity state memory for 10 000 tokens",
        300,
    ),
)  # fmt: skip
BY_NAME = {b.name: b for b in BENCHMARKS}


@dataclass
class Outcome:
    name: str
    command: list[str]
    status: str  # ok | failed | timed out | no figures | missing
    seconds: float
    returncode: int | None
    output_tail: list[str]
    machine: dict[str, Any] | None = None  # as the script saw it when it finished
    figures: list[Figure] = field(default_factory=list)


def say(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------- running


async def _relay(stream: asyncio.StreamReader, tail: deque[str]) -> None:
    while line := await stream.readline():
        text = line.decode(errors="replace").rstrip()
        tail.append(text)
        say(f"    {text}")


async def _interrupt(process: asyncio.subprocess.Process) -> None:
    """SIGINT (the script cleans up what it created), then SIGKILL to all it started."""
    with suppress(ProcessLookupError):
        process.send_signal(signal.SIGINT)
    with suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), INTERRUPT_GRACE_SECONDS)
    # The script leads its own process group (start_new_session): this reaches the services
    # and clients it started, and nothing else.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


def relative(path: Path) -> str:
    return os.path.relpath(path, ROOT)


async def run_benchmark(
    bench: Benchmark, quick: bool, timeout_factor: float, scratch: Path, scripts: Path = BENCH
) -> Outcome:
    json_path = scratch / f"{bench.name}.json"
    args = bench.quick_args if quick else bench.args
    script = scripts / bench.script
    command = [sys.executable, str(script), *args, "--json", str(json_path)]
    timeout = bench.timeout_seconds * timeout_factor
    shown = " ".join([relative(script), *args])
    say(f"{bench.name}: {shown} (at most {timeout:g} s)")
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    started = time.monotonic()
    if not script.is_file():
        tail.append(f"{relative(script)} does not exist")
        say(f"    {tail[-1]}")
        return Outcome(bench.name, command, "missing", 0.0, None, list(tail))
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    relay = asyncio.create_task(_relay(process.stdout, tail))
    status = "ok"
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        status = "timed out"
        await _interrupt(process)
    with suppress(TimeoutError):
        await asyncio.wait_for(relay, 10)  # the rest of the output; a leftover may hold the pipe
    relay.cancel()
    seconds = time.monotonic() - started
    outcome = Outcome(bench.name, command, status, seconds, process.returncode, list(tail))
    if status == "ok" and process.returncode != 0:
        outcome.status = "failed"
    elif status == "ok" and not json_path.is_file():
        outcome.status = "no figures"
    elif status == "ok":
        payload = json.loads(json_path.read_text())
        outcome.machine = payload.get("machine")
        outcome.figures = read_figures(json_path)
        if not outcome.figures:
            outcome.status = "no figures"
    say(f"{bench.name}: {outcome.status} in {seconds:.0f} s")
    return outcome


# ------------------------------------------------------------------------------- the table


def number(value: float | None, unit: str = "") -> str:
    """For the eye: 3-4 significant digits (the JSON file keeps every digit)."""
    if value is None or math.isnan(value):
        return "-"
    magnitude = abs(value)
    text = (
        f"{value:,.0f}"
        if magnitude >= 100
        else f"{value:.1f}"
        if magnitude >= 10
        else f"{value:.2f}"
        if magnitude >= 0.1
        else f"{value:.3g}"
    )
    return f"{text} {unit}".rstrip()


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def figures_table(outcomes: list[Outcome]) -> str:
    rows: list[list[str]] = []
    for outcome in outcomes:
        if outcome.status != "ok":
            why = f"exit {outcome.returncode}" if outcome.status == "failed" else ""
            rows.append(
                [f"{outcome.name}: {outcome.status} {why}".rstrip()] + ["-"] * 4 + ["FAILED"]
            )
            continue
        for f in outcome.figures:
            ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
            rows.append(
                [
                    f.figure,
                    number(f.tokvel, f.unit),
                    number(f.baseline, f.unit),
                    ratio,
                    f.target,
                    "yes" if f.met else "**no**",
                ]
            )
    return markdown(["figure", "tokvel", "baseline", "ratio", "target", "met"], rows)


def describe_machine(info: dict[str, Any] | None) -> str:
    if not info:
        return "unknown"
    load = ", ".join(f"{x:.2f}" for x in info.get("load_average", ()))
    return f"{info.get('cpus')} CPUs, Python {info.get('python')}, load average {load}"


def change(old: float | None, new: float | None) -> str:
    if old is None or new is None or math.isnan(old) or math.isnan(new) or old == 0:
        return "-"
    return f"{(new - old) / abs(old):+.1%}"


def comparison(old: list[Figure], new: list[Figure]) -> str:
    """Every figure of either run: old and new values, their change, the ratios and targets."""
    old_by_name = {f.figure: f for f in old}
    new_by_name = {f.figure: f for f in new}
    names = list(new_by_name) + [n for n in old_by_name if n not in new_by_name]
    rows: list[list[str]] = []
    for name in names:
        a, b = old_by_name.get(name), new_by_name.get(name)
        unit = next(f.unit for f in (b, a) if f is not None)
        met = f"{_met(a)} -> {_met(b)}"
        rows.append(
            [
                name,
                number(a.tokvel, unit) if a else "(absent)",
                number(b.tokvel, unit) if b else "(absent)",
                change(a.tokvel if a else None, b.tokvel if b else None),
                "-" if a is None or a.ratio is None else f"{a.ratio:.2f}x",
                "-" if b is None or b.ratio is None else f"{b.ratio:.2f}x",
                met,
            ]
        )
    return markdown(["figure", "old", "new", "change", "old ratio", "new ratio", "met"], rows)


def _met(figure: Figure | None) -> str:
    return "-" if figure is None else "yes" if figure.met else "no"


def print_comparison(old_path: Path, new_path: Path, new: list[Figure]) -> None:
    old_machine = json.loads(old_path.read_text()).get("machine")
    say(f"\nCompared with {old_path} ({describe_machine(old_machine)}):\n")
    say(comparison(read_figures(old_path), new))
    say(f"\n(new: {new_path})")


# -------------------------------------------------------------------------------------- main


async def run(selected: list[Benchmark], args: argparse.Namespace) -> int:
    started_at = datetime.now(UTC)
    before = machine()
    say(f"tokvel benchmarks, {started_at:%Y-%m-%d %H:%M} UTC, {describe_machine(before)}")
    say(f"{len(selected)} benchmark(s){' (quick)' if args.quick else ''}: "
        + ", ".join(b.name for b in selected) + "\n")  # fmt: skip
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="tokvel-bench-") as scratch:
        for index, bench in enumerate(selected, 1):
            say(f"[{index}/{len(selected)}] " + "-" * 60)
            outcomes.append(
                await run_benchmark(bench, args.quick, args.timeout_factor, Path(scratch))
            )
    after = machine()
    finished_at = datetime.now(UTC)
    figures = [f for o in outcomes for f in o.figures]

    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{started_at:%Y%m%dT%H%M%SZ}.json"
    payload = {
        "started_at": started_at.isoformat(),
        "finished_at": finished_at.isoformat(),
        "quick": args.quick,
        # The machine as report.read_figures and --compare expect it; and at the end.
        "machine": before,
        "machine_after": after,
        "benchmarks": [{k: v for k, v in asdict(o).items() if k != "figures"} for o in outcomes],
        "figures": [asdict(f) for f in figures],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")

    minutes = (finished_at - started_at).total_seconds() / 60
    say(f"\n## tokvel benchmarks, {started_at:%Y-%m-%d %H:%M} UTC ({minutes:.0f} min)\n")
    say(f"Machine: {describe_machine(before)} at the start; load average "
        + ", ".join(f"{x:.2f}" for x in after["load_average"]) + " at the end.\n")  # fmt: skip
    say(figures_table(outcomes))
    loads = [f"{o.name} {o.machine['load_average'][0]:.2f}" for o in outcomes if o.machine]
    say("\nLoad average (1 min) as each benchmark finished: " + ", ".join(loads))
    say(f"\nWritten to {path}")
    if args.compare:
        print_comparison(args.compare[0], path, figures)
    return 0 if all(o.status == "ok" for o in outcomes) else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks: " + ", ".join(BY_NAME),
    )
    parser.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="NAME")
    parser.add_argument("--skip", nargs="+", choices=list(BY_NAME), default=[], metavar="NAME")
    parser.add_argument("--quick", action="store_true", help="smaller, shorter runs")
    parser.add_argument(
        "--compare", nargs="+", type=Path, metavar="JSON",
        help="OLD.json: deltas after this run; OLD.json NEW.json: deltas only, no run",
    )  # fmt: skip
    parser.add_argument(
        "--timeout-factor", type=float, default=1.0, help="multiplies every time limit"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--list", action="store_true", help="the benchmarks, then exit")
    args = parser.parse_args(argv)

    if args.list:
        for b in BENCHMARKS:
            say(f"{b.name:18} bench/{b.script:28} {b.what}")
        return 0
    if args.compare and len(args.compare) > 2:
        parser.error("--compare takes OLD.json, or OLD.json NEW.json")
    if args.compare and len(args.compare) == 2:
        old, new = args.compare
        print_comparison(old, new, read_figures(new))
        return 0
    # A script past its time is stopped with SIGINT, so that it removes what it created. Started
    # in the background (nohup, &), this process ignores SIGINT and its children would inherit
    # that; with a handler here they start with the default one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    names = args.only or list(BY_NAME)
    selected = [BY_NAME[n] for n in names if n not in args.skip]
    if not selected:
        parser.error("no benchmark selected")
    return asyncio.run(run(selected, args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
