"""The hot queries' plans: token_metrics is read through an index of the partitions its time
range selects, never scanned, with custom plans (planning-time pruning) and generic plans
(pruning at executor start-up), as prepared statements are executed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from api_gateway.repository import (
    LIST_AS_OF,
    HistoryRange,
    history_statement,
    list_statement,
)
from tests.integration.gateway.dataset import Dataset

pytestmark = pytest.mark.integration

DAY = datetime(2017, 8, 10, tzinfo=UTC)
INDEX_SCANS = {"Index Scan", "Index Only Scan", "Bitmap Heap Scan", "Bitmap Index Scan"}


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from nodes(child)


async def explain(
    conn: asyncpg.Connection, statement: str, args: tuple[Any, ...], generic: bool
) -> dict[str, Any]:
    """The plan a prepared ``statement`` executes with ``args``: a server-side prepared
    statement, so that plan_cache_mode decides between a custom and a generic plan."""
    mode = "force_generic_plan" if generic else "force_custom_plan"
    await conn.execute(f"SET plan_cache_mode = {mode}")
    await conn.execute(f"PREPARE hot AS {statement}")
    try:
        values = ", ".join(literal(a) for a in args)
        text = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE hot({values})")
    finally:
        await conn.execute("DEALLOCATE hot")
    plan: dict[str, Any] = orjson.loads(text)[0]["Plan"]
    return plan


def literal(value: Any) -> str:
    """EXECUTE takes no bind parameters: the test's own values, as SQL literals."""
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, timedelta):
        return f"'{value.total_seconds()} seconds'::interval"
    raise TypeError(value)


def assert_pruned_index_access(plan: dict[str, Any], partitions: set[str]) -> None:
    metric_nodes = [
        n for n in nodes(plan) if str(n.get("Relation Name", "")).startswith("token_metrics")
    ]
    assert metric_nodes, "token_metrics is read"
    for node in metric_nodes:
        assert node["Node Type"] != "Seq Scan", node
        assert node["Node Type"] in INDEX_SCANS, node
    scanned = {n["Relation Name"] for n in metric_nodes}
    assert scanned <= partitions, f"{scanned} not within {partitions}"


def partitions(first: datetime, days: int) -> set[str]:
    return {f"token_metrics_p{(first + timedelta(days=d)):%Y%m%d}" for d in range(days)}


@pytest.fixture
async def conn(db_url: str) -> Any:
    connection = await asyncpg.connect(db_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
@pytest.mark.parametrize(
    ("interval", "fill"), [("raw", "none"), ("5m", "none"), ("1h", "none"), ("1h", "linear")]
)
async def test_history_reads_one_day_through_the_index(
    conn: asyncpg.Connection, dataset: Dataset, generic: bool, interval: str, fill: str
) -> None:
    query = HistoryRange(
        token_id=dataset.token_ids[1],
        start=DAY,
        end=DAY + timedelta(days=1),
        interval=interval,  # type: ignore[arg-type]  # parametrized with valid literals
        fill=fill,  # type: ignore[arg-type]
        page_start=DAY + timedelta(hours=6),
        limit=1001,
    )
    statement, args = history_statement(query)
    plan = await explain(conn, statement, args, generic)
    assert_pruned_index_access(plan, partitions(DAY, 1))
    if generic:
        assert max(n.get("Subplans Removed", 0) for n in nodes(plan)) > 0


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
@pytest.mark.parametrize("sort", ["velocity", "market_cap", "symbol"])
async def test_ranking_as_of_probes_two_days_through_the_index(
    conn: asyncpg.Connection, dataset: Dataset, generic: bool, sort: str
) -> None:
    statement, args = list_statement(sort, "desc", 50, 100, dataset.newest)  # type: ignore[arg-type]
    assert statement == LIST_AS_OF[sort, "desc"]  # type: ignore[index]
    plan = await explain(conn, statement, args, generic)
    assert_pruned_index_access(plan, partitions(DAY, 2))
    if generic:
        removed = [n.get("Subplans Removed", 0) for n in nodes(plan)]
        assert max(removed) > 0, "pruned at executor start-up"


async def test_a_week_of_raw_history_stays_in_its_partitions(
    conn: asyncpg.Connection, dataset: Dataset
) -> None:
    start = datetime(2017, 8, 4, tzinfo=UTC)
    query = HistoryRange(
        dataset.token_ids[1], start, start + timedelta(days=7), "raw", "none", start, 1001
    )
    statement, args = history_statement(query)
    plan = await explain(conn, statement, args, generic=False)
    assert_pruned_index_access(plan, partitions(start, 7))
