"""Schemathesis against the served app's own /openapi.json: 0 failures.

Checks: no server errors, responses (bodies, headers, status codes, content types) conform to
the schema, and authentication declared in the schema is enforced (``ignored_auth``). The run
is bounded (examples per operation, a fixed seed) to keep the suite fast; a longer run is
``SCHEMATHESIS_MAX_EXAMPLES=1000 pytest tests/integration/gateway/test_schemathesis.py``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.integration.gateway.conftest import Api

pytestmark = pytest.mark.integration

CHECKS = (
    "not_a_server_error",
    "response_schema_conformance",
    "response_headers_conformance",
    "status_code_conformance",
    "content_type_conformance",
    "ignored_auth",
)
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


async def test_schemathesis_finds_no_failure(api: Api, tmp_path: Path) -> None:
    max_examples = os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25")
    process = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        f"{api.base_url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--header",
        f"X-API-Key: {api.key}",
        "--max-examples",
        max_examples,
        "--seed",
        "20170810",
        "--workers",
        "2",
        "--request-timeout",
        "10",
        "--no-color",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-8000:]
