"""The abuse suite's fixtures: its scale, the stack under attack, and the table of figures.

Two scales. By default (``make test``, CI) each attack runs small enough for the whole suite
to take about two minutes; ``TOKVEL_ABUSE_SCALE=full`` (``make abuse``) runs the sizes of
issue 19 (schemathesis over 1 000 cases, 10 000 random keys, 1 000 slow clients...). Every test
records what it measured in ``figures``; the table is printed at the end of the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.abuse.stack import REDIS_DB, AbuseStack, running_stack
from tests.conftest import TEST_DB_PREFIX, LoadedData
from tests.support.databases import create_database, drop_database, with_database
from tests.support.kafka import tokvel_topics
from tokvel_common.settings import CommonSettings

FULL: Final = os.environ.get("TOKVEL_ABUSE_SCALE", "quick") == "full"


@dataclass(frozen=True)
class Scale:
    name: str
    schemathesis_examples: int  # per operation; the cases generated are reported
    schemathesis_min_cases: int
    random_keys: int
    slow_clients: int
    slow_seconds: float
    ws_silent_clients: int
    ws_oversize_clients: int
    ws_flooders: int
    injection_payloads: int  # how many of the payload list each parameter gets
    bomb_rounds: int


QUICK: Final = Scale(
    name="quick",
    schemathesis_examples=3,  # about 400 cases, mostly from the coverage phase
    schemathesis_min_cases=150,
    random_keys=1_000,
    slow_clients=100,
    slow_seconds=6.0,
    ws_silent_clients=20,
    ws_oversize_clients=10,
    ws_flooders=5,
    injection_payloads=6,
    bomb_rounds=1,
)
FULL_SCALE: Final = Scale(
    name="full",
    schemathesis_examples=100,  # about 2 000 cases
    schemathesis_min_cases=1_000,
    random_keys=10_000,
    slow_clients=1_000,
    slow_seconds=20.0,
    ws_silent_clients=200,
    ws_oversize_clients=100,
    ws_flooders=50,
    injection_payloads=1_000,  # all of them
    bomb_rounds=5,
)


@pytest.fixture(scope="session")
def scale() -> Scale:
    return FULL_SCALE if FULL else QUICK


@dataclass(frozen=True)
class Figure:
    check: str
    value: str
    bound: str
    result: str  # "ok", "FAILED", or "note" (measured, not a pass condition)


class Figures:
    """What the suite measured, in the order measured (failed checks included)."""

    def __init__(self) -> None:
        self.rows: list[Figure] = []

    def add(self, check: str, value: str, bound: str, ok: bool) -> bool:
        self.rows.append(Figure(check, value, bound, "ok" if ok else "FAILED"))
        return ok

    def note(self, check: str, value: str, remark: str) -> None:
        self.rows.append(Figure(check, value, remark, "note"))


_FIGURES: Final = Figures()


@pytest.fixture(scope="session")
def figures() -> Figures:
    return _FIGURES


SUITE: Final = Path(__file__).parent
RUNS_LAST: Final = SUITE / "test_secrets.py"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The secrets check reads the logs of everything sent before it: last of this suite."""
    positions = [n for n, item in enumerate(items) if item.path.is_relative_to(SUITE)]
    ordered = sorted((items[n] for n in positions), key=lambda item: item.path == RUNS_LAST)
    for position, item in zip(positions, ordered, strict=True):
        items[position] = item


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = _FIGURES.rows
    if not rows:
        return
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("check", "value", "bound")]
    scale_name = FULL_SCALE.name if FULL else QUICK.name
    terminalreporter.section(f"abuse suite figures ({scale_name} scale)")
    header = ("check", "measured", "pass when")
    terminalreporter.write_line(
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  result"
    )
    for row in rows:
        cells = (row.check, row.value, row.bound)
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        terminalreporter.write_line(f"{line}  {row.result}")
    failed = sum(r.result == "FAILED" for r in rows)
    terminalreporter.write_line(f"{len(rows)} figures, {failed} failed")


@pytest.fixture(scope="package")
async def stack(
    settings: CommonSettings,
    loaded_data: LoadedData,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[AbuseStack]:
    """Gateway and broadcaster processes over a database of their own (the recorded data),
    for this suite only (stopped after its last test).

    Redis database 6 is not flushed: what the services keep there is keyed by API key hash,
    instance id or token (the same recorded data in every clone), so two runs can share it.
    """
    admin_dsn = settings.database_url.get_secret_value()
    database = await create_database(
        admin_dsn, prefix=TEST_DB_PREFIX, template=loaded_data.template
    )
    redis_url = urlunsplit(
        urlsplit(settings.redis_url.get_secret_value())._replace(path=f"/{REDIS_DB}")
    )
    prefix = f"abuse-{uuid.uuid4().hex[:10]}."
    try:
        async with (
            tokvel_topics(settings.kafka_bootstrap_servers, prefix),
            running_stack(
                settings,
                with_database(admin_dsn, database),
                redis_url,
                prefix,
                tmp_path_factory.mktemp("abuse-logs"),
            ) as running,
        ):
            yield running
    finally:
        await drop_database(admin_dsn, database)
