"""The chaos suite's short version, as CI runs it: ``python -m tests.chaos --quick``.

It runs in a process of its own on a private stack that it starts and stops itself (ports
offset by 2050, state in ``.run/chaos-quick``, services on 19050 and up), so that neither this
session's stack nor a ``make chaos`` running on the default chaos ports is touched: one
writer kill -9 and a 15 s Redis freeze during a replay of 150 snapshots, then the same
accounting as the full suite (nothing lost, nothing twice, every number as recomputed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.chaos.environment import PORT_BASE_ENV
from tokvel_common.infra.layout import RUN_DIR_ENV
from tokvel_common.localstack import PORT_OFFSET_ENV
from tokvel_common.paths import PROJECT_ROOT

pytestmark = pytest.mark.e2e

PORT_OFFSET = 2050
PORT_BASE = 19050
RUN_SECONDS = 540.0  # about 150 s on the 2-core machine under load, infra start included
# The figures that say what the short version is for; each must be in the table and met.
REQUIRED = (
    "kill -9 writer",
    "API errors, Redis frozen (SIGSTOP) 15 s",
    "samples lost (published, not in token_metrics)",
    "duplicated or unexpected rows in token_metrics",
    "token_metrics rows ≠ offline recomputation",
    "token_latest ≠ offline recomputation",
    "REST /velocity ≠ offline recomputation",
)


@pytest.mark.timeout(RUN_SECONDS + 60)
def test_a_writer_kill_and_a_redis_freeze_lose_nothing_and_change_no_number(tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    env = {
        **os.environ,
        PORT_OFFSET_ENV: str(PORT_OFFSET),
        RUN_DIR_ENV: str(PROJECT_ROOT / ".run" / "chaos-quick"),
        PORT_BASE_ENV: str(PORT_BASE),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--quick", "--json", str(figures_path)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
    )
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"python -m tests.chaos --quick: exit {done.returncode}\n{output}"
    figures = {f["name"]: f for f in orjson.loads(figures_path.read_bytes())["figures"]}
    missing = [name for name in REQUIRED if name not in figures]
    assert not missing, f"figures missing from the report: {missing}\n{output}"
    unmet = [figures[name] for name in REQUIRED if not figures[name]["met"]]
    assert not unmet, f"figures missing their target: {unmet}\n{output}"
