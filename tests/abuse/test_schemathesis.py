"""Schemathesis against the running gateway's own ``/openapi.json``: every check, 0 failures.

``--checks all`` (server errors, schema, headers, status codes and content types of responses;
schema-violating requests refused, schema-valid ones accepted; missing headers, unsupported
methods, Allow headers, ignored auth...) and ``--max-response-time``, with a real API key. The
one exception is in ``schemathesis.toml`` with its reason. Quick scale: a fixed seed and about
200 cases; full scale (``make abuse``): a fresh seed (printed) and over 1 000 cases.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

import pytest

from tests.abuse.conftest import FULL, Figures, Scale
from tests.abuse.stack import AbuseStack

pytestmark = pytest.mark.abuse

SCHEMATHESIS: Final = Path(sys.executable).with_name("schemathesis")
CONFIG: Final = Path(__file__).with_name("schemathesis.toml")
QUICK_SEED: Final = "20170810"
MAX_RESPONSE_SECONDS: Final = "10"


@pytest.mark.timeout(1800 if FULL else 300)
async def test_schemathesis_all_checks_find_nothing(
    stack: AbuseStack, scale: Scale, figures: Figures, tmp_path: Path
) -> None:
    key = await stack.new_key()
    report = tmp_path / "schemathesis.json"
    seed = [] if FULL else ["--seed", QUICK_SEED]
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "--config-file",
        str(CONFIG),
        "run",
        f"{stack.gateway.base_url}/openapi.json",
        "--checks",
        "all",
        "--max-response-time",
        MAX_RESPONSE_SECONDS,
        "--header",
        f"X-API-Key: {key}",
        "--max-examples",
        str(scale.schemathesis_examples),
        *seed,
        "--workers",
        "2",
        "--request-timeout",
        "20",
        "--no-color",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    output, _ = await process.communicate()
    text = output.decode(errors="replace")
    assert report.exists(), text[-8000:]
    # json, not orjson: the seed is a 128-bit integer.
    result: dict[str, Any] = json.loads(report.read_bytes())
    cases = result["test_cases"]
    generated, failed, errored = cases["generated"], cases["with_failures"], cases["errored"]
    ok = figures.add(
        "schemathesis, all checks",
        f"{generated} cases, {failed} failed, {errored} errors (seed {result['seed']}, "
        f"{result['running_time']:.1f} s)",
        f">= {scale.schemathesis_min_cases} cases, 0 failed, 0 errors",
        process.returncode == 0
        and generated >= scale.schemathesis_min_cases
        and failed == errored == 0,
    )
    assert ok, text[-8000:]
