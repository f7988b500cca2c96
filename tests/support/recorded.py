"""Real recorded CMC samples (``../shared/data``, read in place) as the processor would emit them.

The velocity processor is not part of these tests, so a sample's windows are left empty and its
velocity is the instantaneous one from :func:`tokvel_common.velocity_math.compute_velocity`;
every other field is the recording's, untouched.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from tokvel_common.db.codecs import as_numeric
from tokvel_common.events import MetricsSample
from tokvel_common.velocity_math import compute_velocity
from writer.repository import details_json

_TS_PREFIX = b'{"ts":"'


def _line_ts(line: bytes) -> str:
    """The snapshot time of a line without parsing it (lines start with their ``ts``)."""
    if line.startswith(_TS_PREFIX):
        return line[len(_TS_PREFIX) : len(_TS_PREFIX) + 20].decode()
    return str(orjson.loads(line)["ts"])


def recorded_rows(path: Path, start: str, end: str) -> Iterator[dict[str, Any]]:
    """The rows whose snapshot time lies in ``[start, end)`` (ISO 8601 UTC, ``...Z``)."""
    with gzip.open(path, "rb") as lines:
        for line in lines:
            ts = _line_ts(line)
            if ts >= end:
                return
            if ts >= start:
                yield orjson.loads(line)


def metrics_sample(row: dict[str, Any]) -> MetricsSample:
    velocity = compute_velocity(row["volume_24h_usd"], row["market_cap_usd"])
    flags = [*row["flags"], *([velocity.flag] if velocity.flag else [])]
    return MetricsSample(
        cmc_id=row["cmc_id"],
        symbol=row["symbol"],
        name=row["name"],
        slug=row["slug"],
        cmc_rank=row["cmc_rank"],
        # The recording has no last_updated: the snapshot time stands in (as in the replay).
        ts=row["last_updated"] or row["ts"],
        price_usd=row["price_usd"],
        market_cap_usd=row["market_cap_usd"],
        volume_24h_usd=row["volume_24h_usd"],
        circulating_supply=row["circulating_supply"],
        total_supply=row["total_supply"],
        max_supply=row["max_supply"],
        percent_change_1h=row["percent_change_1h"],
        percent_change_24h=row["percent_change_24h"],
        percent_change_7d=row["percent_change_7d"],
        velocity=velocity.velocity,
        velocity_1h=None,
        velocity_4h=None,
        velocity_12h=None,
        velocity_24h=velocity.velocity,
        velocity_7d=None,
        coverage={},
        trend="insufficient_data",
        data_quality_score=1.0 if velocity.computable else 0.5,
        quality_flags=flags,
    )


def recorded_samples(path: Path, start: str, end: str) -> list[MetricsSample]:
    return [metrics_sample(row) for row in recorded_rows(path, start, end)]


def metric_record(token_id: int, s: MetricsSample) -> tuple[Any, ...]:
    """One token_metrics row as column values, in ``writer.repository.METRIC_COLUMNS`` order:
    numeric columns as the exact ``Decimal`` of ``as_numeric`` (asyncpg's binary encoder's own
    type), doubles as floats, ``details`` as the writer writes it."""
    return (
        token_id,
        s.ts,
        s.cmc_rank,
        as_numeric(s.price_usd),
        as_numeric(s.market_cap_usd),
        as_numeric(s.volume_24h_usd),
        as_numeric(s.circulating_supply),
        as_numeric(s.total_supply),
        as_numeric(s.max_supply),
        as_numeric(s.percent_change_1h),
        as_numeric(s.percent_change_24h),
        as_numeric(s.percent_change_7d),
        as_numeric(s.velocity),
        s.velocity_1h,
        s.velocity_4h,
        s.velocity_12h,
        as_numeric(s.velocity_24h),
        s.velocity_7d,
        as_numeric(s.data_quality_score),
        s.trend,
        s.quality_flags,
        details_json(s),
    )
