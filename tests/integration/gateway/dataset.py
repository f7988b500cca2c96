"""Real recorded CMC data loaded straight into PostgreSQL, shaped as the writer would store it.

Two days (2017-08-10 and 2017-08-11) of the 5-minute top-200 week, every token (208 of them,
about 112 000 samples), plus, from the hourly file (2017-08-04 to 08-11), the tokens whose symbol
another token also uses (CMC symbols are not unique: ETP, PBT, SNC, TIX). Read in place from
``../shared/data``.

Velocity is computed trivially here (the velocity processor is another service's): the ratio
capped at 100, window means over the computable samples, the trend rule of ARCHITECTURE.md and
a plain quality score. The gateway only needs plausible, consistent numbers.
"""

from __future__ import annotations

import gzip
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from tests.support.recorded import metric_record
from tokvel_common.cache import TokenMetadata, TokenSnapshot
from tokvel_common.db.codecs import as_numeric
from tokvel_common.events import MetricsSample, WindowCoverage
from tokvel_common.paths import SHARED_DATA_DIR
from writer.repository import METRIC_COLUMNS

FIVE_MINUTE_FILE = SHARED_DATA_DIR / "cmc-web-2017-08-10_5min_top200.jsonl.gz"
HOURLY_FILE = SHARED_DATA_DIR / "cmc-web-2017-08_hourly.jsonl.gz"
START = datetime(2017, 8, 10, tzinfo=UTC)
HOURLY_START = datetime(2017, 8, 4, tzinfo=UTC)
END = datetime(2017, 8, 12, tzinfo=UTC)
PARTITION_FIRST_DAY = date(2017, 8, 3)
PARTITION_DAYS = 12  # 08-03 .. 08-14: more partitions than any query needs, so pruning shows

WINDOWS = {"1h": timedelta(hours=1), "4h": timedelta(hours=4), "12h": timedelta(hours=12)}


def _rows(path: Path, start: datetime) -> Iterator[dict[str, Any]]:
    # Lines start with {"ts":"<ISO time>": skip those before `start` without parsing them.
    first = start.strftime("%Y-%m-%dT%H:%M")
    with gzip.open(path, "rb") as handle:
        for line in handle:
            if line[7:23].decode() < first:
                continue
            row = orjson.loads(line)
            ts = datetime.fromisoformat(row["ts"].replace("Z", "+00:00"))
            if ts >= END:
                return
            if ts >= start:
                row["ts"] = ts
                yield row


def _velocity(row: dict[str, Any]) -> float | None:
    volume, cap = row["volume_24h_usd"], row["market_cap_usd"]
    if volume is None or cap is None or cap <= 0:
        return None
    ratio: float = round(min(volume / cap, 100.0), 8)
    return ratio


def _trend(current: float | None, previous: deque[float]) -> tuple[str, float | None]:
    if current is None or len(previous) < 3:
        return "insufficient_data", None
    recent = sum(list(previous)[-3:]) / 3
    if recent == 0:
        return ("stable" if current == 0 else "increasing"), recent
    if (current - recent) / recent > 0.05:
        return "increasing", recent
    if (recent - current) / recent > 0.05:
        return "decreasing", recent
    return "stable", recent


@dataclass
class _Window:
    span: timedelta
    values: deque[tuple[datetime, float]] = field(default_factory=deque)
    total: float = 0.0

    def add(self, ts: datetime, value: float | None) -> None:
        if value is not None:
            self.values.append((ts, value))
            self.total += value
        while self.values and self.values[0][0] <= ts - self.span:
            self.total -= self.values.popleft()[1]


@dataclass
class _TokenState:
    windows: dict[str, _Window] = field(
        default_factory=lambda: {
            name: _Window(span) for name, span in (*WINDOWS.items(), ("7d", timedelta(days=7)))
        }
    )
    previous: deque[float] = field(default_factory=lambda: deque(maxlen=3))


def _sample(row: dict[str, Any], state: _TokenState, step_minutes: int) -> MetricsSample:
    ts: datetime = row["ts"]
    velocity = _velocity(row)
    windows: dict[str, float | None] = {}
    coverage: dict[str, WindowCoverage] = {}
    for name, window in state.windows.items():
        window.add(ts, velocity)
        used = len(window.values)
        windows[name] = window.total / used if used else None
        expected = int(window.span / timedelta(minutes=step_minutes))
        # model_construct: the values are built here, validating 560 000 models costs seconds
        coverage[name] = WindowCoverage.model_construct(points_used=used, points_expected=expected)
    trend, recent = _trend(velocity, state.previous)
    if velocity is not None:
        state.previous.append(velocity)
    flags = []
    if row["volume_24h_usd"] is None:
        flags.append("volume_missing")
    if row["market_cap_usd"] is None:
        flags.append("market_cap_missing")
    if row["percent_change_7d"] is None:
        flags.append("percent_change_7d_missing")
    score = round(max(0.0, 1.0 - 0.3 * len(flags)), 2)
    return MetricsSample.model_construct(
        cmc_id=row["cmc_id"],
        symbol=row["symbol"],
        name=row["name"],
        slug=row["slug"],
        cmc_rank=row["cmc_rank"],
        ts=ts,
        price_usd=row["price_usd"],
        market_cap_usd=row["market_cap_usd"],
        volume_24h_usd=row["volume_24h_usd"],
        circulating_supply=row["circulating_supply"],
        total_supply=row["total_supply"],
        max_supply=row["max_supply"],
        percent_change_1h=row["percent_change_1h"],
        percent_change_24h=row["percent_change_24h"],
        percent_change_7d=row["percent_change_7d"],
        velocity=velocity if velocity is not None else 0.0,
        velocity_1h=windows["1h"],
        velocity_4h=windows["4h"],
        velocity_12h=windows["12h"],
        velocity_24h=velocity if velocity is not None else 0.0,
        velocity_7d=windows["7d"],
        coverage=coverage,  # type: ignore[arg-type]  # keys are the window literals
        trend=trend,  # type: ignore[arg-type]  # one of the Trend literals
        trend_recent_avg=recent,
        data_quality_score=score,
        quality_flags=flags,
        polled_at=ts,
        schema_version=1,
    )


@dataclass
class Dataset:
    latest: dict[int, MetricsSample]
    samples_per_token: dict[int, int]
    token_ids: dict[int, int]  # cmc id -> tokens.id
    colliding_symbols: dict[str, list[int]]
    newest: datetime

    def snapshot(self, cmc_id: int) -> MetricsSample:
        return self.latest[cmc_id]


def _collect() -> tuple[dict[int, list[MetricsSample]], dict[str, list[int]]]:
    samples: dict[int, list[MetricsSample]] = defaultdict(list)
    states: dict[int, _TokenState] = defaultdict(_TokenState)
    symbols: dict[str, set[int]] = defaultdict(set)
    for row in _rows(FIVE_MINUTE_FILE, START):
        samples[row["cmc_id"]].append(_sample(row, states[row["cmc_id"]], 5))
        symbols[row["symbol"]].add(row["cmc_id"])
    hourly = list(_rows(HOURLY_FILE, HOURLY_START))
    hourly_symbols: dict[str, set[int]] = defaultdict(set)
    for row in hourly:
        hourly_symbols[row["symbol"]].add(row["cmc_id"])
    wanted = {
        cmc_id
        for symbol, ids in hourly_symbols.items()
        for cmc_id in ids
        if cmc_id not in samples and (len(ids) > 1 or symbols.get(symbol, set()) - {cmc_id})
    }
    for row in hourly:
        if row["cmc_id"] in wanted:
            samples[row["cmc_id"]].append(_sample(row, states[row["cmc_id"]], 60))
            symbols[row["symbol"]].add(row["cmc_id"])
    collisions = {s: sorted(ids) for s, ids in symbols.items() if len(ids) > 1}
    return samples, collisions


async def load(conn: asyncpg.Connection) -> Dataset:
    samples, collisions = _collect()
    latest = {cmc_id: rows[-1] for cmc_id, rows in samples.items()}
    token_rows = await conn.fetch(
        """
        INSERT INTO tokens (cmc_id, symbol, name, slug, cmc_rank)
        SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::integer[])
        RETURNING id, cmc_id
        """,
        list(latest),
        [s.symbol for s in latest.values()],
        [s.name for s in latest.values()],
        [s.slug for s in latest.values()],
        [s.cmc_rank for s in latest.values()],
    )
    token_ids = {r["cmc_id"]: r["id"] for r in token_rows}
    await conn.execute(
        "SELECT tokvel_ensure_partitions($1::date, $2::integer)",
        PARTITION_FIRST_DAY,
        PARTITION_DAYS,
    )
    await conn.copy_records_to_table(
        "token_metrics",
        records=(
            metric_record(token_ids[cmc_id], s) for cmc_id, rows in samples.items() for s in rows
        ),
        columns=METRIC_COLUMNS,
    )
    await upsert_latest(conn, token_ids, list(latest.values()))
    await conn.execute("ANALYZE")
    return Dataset(
        latest=latest,
        samples_per_token={k: len(v) for k, v in samples.items()},
        token_ids=token_ids,
        colliding_symbols=collisions,
        newest=max(s.ts for s in latest.values()),
    )


async def upsert_latest(
    conn: asyncpg.Connection, token_ids: dict[int, int], samples: list[MetricsSample]
) -> None:
    await conn.execute(
        """
        INSERT INTO token_latest AS l (token_id, "timestamp", cmc_rank, market_cap_usd, sample)
        SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::integer[], $4::numeric[],
                             $5::jsonb[])
        ON CONFLICT (token_id) DO UPDATE
        SET "timestamp" = EXCLUDED."timestamp", cmc_rank = EXCLUDED.cmc_rank,
            market_cap_usd = EXCLUDED.market_cap_usd, sample = EXCLUDED.sample
        """,
        [token_ids[s.cmc_id] for s in samples],
        [s.ts for s in samples],
        [s.cmc_rank for s in samples],
        [as_numeric(s.market_cap_usd) for s in samples],
        [orjson.dumps(s.model_dump(mode="python")).decode() for s in samples],
    )


def token_snapshot(sample: MetricsSample) -> TokenSnapshot:
    """The cached value the writer would store for this sample (metadata from the sample)."""
    return TokenSnapshot(
        token=TokenMetadata(
            cmc_id=sample.cmc_id,
            symbol=sample.symbol,
            name=sample.name,
            slug=sample.slug,
            cmc_rank=sample.cmc_rank,
        ),
        metrics=sample,
    )
