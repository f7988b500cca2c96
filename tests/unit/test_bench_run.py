"""``bench/run.py``: a benchmark script that fails, hangs or writes nothing is a failed row of
the table and the run goes on; the table and the comparison of two runs show every figure.

The scripts here are stand-ins written to a temporary directory (no benchmark is run).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, replace
from pathlib import Path

from bench.report import Figure
from bench.run import Benchmark, Outcome, comparison, figures_table, run_benchmark

FIGURE = Figure(
    figure="writer rows/s",
    unit="rows/s",
    tokvel=12345.678,
    target=">= 60% of baseline",
    met=False,
    baseline=40000.0,
    baseline_name="raw COPY",
    ratio=0.30864195,
)


def script(directory: Path, name: str, body: str) -> str:
    (directory / name).write_text(textwrap.dedent(body))
    return name


async def run(tmp_path: Path, name: str, body: str, limit_seconds: float = 120.0) -> Outcome:
    bench = Benchmark(name, script(tmp_path, f"{name}.py", body), "stand-in", limit_seconds)
    return await run_benchmark(bench, False, 1.0, tmp_path, scripts=tmp_path)


async def test_a_script_that_writes_figures_is_ok(tmp_path: Path) -> None:
    payload = {"machine": {"cpus": 2}, "figures": [asdict(FIGURE)]}
    outcome = await run(
        tmp_path,
        "good",
        f"""
        import sys
        from pathlib import Path
        print("measuring")
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text({json.dumps(json.dumps(payload))})
        """,
    )
    assert outcome.status == "ok"
    assert outcome.returncode == 0
    assert outcome.machine == {"cpus": 2}
    assert outcome.figures == [FIGURE]
    assert outcome.output_tail == ["measuring"]


async def test_a_failing_script_is_a_failed_row(tmp_path: Path) -> None:
    outcome = await run(tmp_path, "broken", "import sys\nprint('no broker')\nsys.exit(3)\n")
    assert (outcome.status, outcome.returncode) == ("failed", 3)
    assert outcome.output_tail == ["no broker"]
    assert outcome.figures == []
    assert "| broken: failed exit 3 | - | - | - | - | FAILED |" in figures_table([outcome])


async def test_a_script_past_its_time_is_interrupted(tmp_path: Path) -> None:
    body = """
    import time
    try:
        print("started", flush=True)
        time.sleep(600)
    except KeyboardInterrupt:
        print("cleaning up", flush=True)
        raise
    """
    outcome = await run(tmp_path, "hangs", body, limit_seconds=2.0)
    assert outcome.status == "timed out"
    assert outcome.output_tail[:2] == ["started", "cleaning up"]  # SIGINT came first


async def test_no_figures_and_no_script_are_failed_rows(tmp_path: Path) -> None:
    silent = await run(tmp_path, "silent", "print('done')\n")
    assert silent.status == "no figures"
    missing = await run_benchmark(
        Benchmark("gone", "gone.py", "absent", 10.0), False, 1.0, tmp_path, scripts=tmp_path
    )
    assert missing.status == "missing"
    table = figures_table([silent, missing])
    assert "| silent: no figures | - | - | - | - | FAILED |" in table
    assert "| gone: missing | - | - | - | - | FAILED |" in table


def test_the_table_shows_each_figure_with_its_baseline_and_target() -> None:
    outcome = Outcome("writer", [], "ok", 1.0, 0, [], figures=[FIGURE])
    rows = figures_table([outcome]).splitlines()
    assert rows[0] == "| figure | tokvel | baseline | ratio | target | met |"
    assert rows[2] == (
        "| writer rows/s | 12,346 rows/s | 40,000 rows/s | 0.31x | >= 60% of baseline | **no** |"
    )


def test_the_comparison_covers_figures_of_either_run() -> None:
    old = [FIGURE, Figure("gone", "ms", 5.0, "< 10 ms", True)]
    new = [
        replace(FIGURE, tokvel=24691.356, ratio=0.6172839, met=True),
        Figure("added", "MiB", 100.0, "< 128 MiB", True),
    ]
    rows = comparison(old, new).splitlines()
    assert rows[2] == (
        "| writer rows/s | 12,346 rows/s | 24,691 rows/s | +100.0% | 0.31x | 0.62x | no -> yes |"
    )
    assert rows[3] == "| added | (absent) | 100 MiB | - | - | - | - -> yes |"
    assert rows[4] == "| gone | 5.00 ms | (absent) | - | - | - | yes -> - |"
