"""After the faults: has every sample been stored once, with the numbers an offline recomputation
gives?

The replay is let run to its last snapshot and the pipeline to its end. Then:

- **source**: the samples on ``cmc.quotes.raw``. A snapshot the replay server served to an
  ingestor killed before Kafka acknowledged its quotes is never published: CMC's listings have
  no history, so the next poll gets the next snapshot. That is the one loss a poller cannot
  avoid; it is counted apart, and must not exceed one snapshot per ingestor kill.
- **lost**: published samples missing from ``token_metrics``; **duplicated**: rows beyond one
  per published sample (the primary key should make it impossible; counted anyway).
- **state**: every row of ``token_metrics``, every token's ``token_latest`` and every token's
  ``GET /v1/tokens/{id}/velocity`` against :mod:`tests.support.replay_reference` fed with the
  recording's rows of the published samples (velocity, the four window means, their coverage,
  the trend).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import aiohttp
import asyncpg
import orjson

from tests.chaos.stack import Chaos, ChaosError, eventually, log
from tests.support.kafka import read_records
from tests.support.replay_reference import (
    Comparison,
    Observed,
    Replay,
    Sample,
    compare,
    expected_replay,
    replayed_rows,
    sample_of,
)
from tokvel_common.drills.common import Figure
from tokvel_common.events import MetricsSample, RawQuote
from tokvel_common.serialization import decode
from tokvel_common.topics import DEAD_LETTERS, METRICS, RAW_QUOTES

SETTLED_SECONDS = 5.0  # cmc.quotes.raw unchanged this long after the last snapshot: all in
STORED_SECONDS = 300.0  # the last samples through velocity and the writer
READ_SECONDS = 300.0  # reading a whole topic back
SHOWN = 5

SELECT_ROWS = """
SELECT t.cmc_id, m."timestamp", m.velocity, m.velocity_24h, m.velocity_1h, m.velocity_4h,
       m.velocity_12h, m.velocity_7d, m.trend, m.details -> 'coverage' AS coverage
FROM token_metrics m JOIN tokens t ON t.id = m.token_id
"""
SELECT_LATEST = "SELECT l.sample FROM token_latest l"


async def wait_for_the_end(chaos: Chaos) -> None:
    """Until the replay has served its last snapshot and every sample published is stored."""
    budget = chaos.replayed.snapshots * chaos.replayed.poll_seconds * 3 + 300

    async def replay_over() -> bool | None:
        return True if (await chaos.replay_state()).get("exhausted") else None

    log("waiting for the replay's last snapshot")
    await eventually(replay_over, what="the replay's last snapshot", within=budget, interval=2)
    settled: dict[str, Any] = {"ends": None, "since": time.monotonic()}

    async def raw_settled() -> bool | None:
        ends = await chaos.end_offsets(RAW_QUOTES)
        if ends != settled["ends"]:
            settled.update(ends=ends, since=time.monotonic())
        return True if time.monotonic() - settled["since"] >= SETTLED_SECONDS else None

    await eventually(raw_settled, what="cmc.quotes.raw settled", within=120)
    published = sum(settled["ends"].values())
    last: dict[str, int | None] = {"rows": None}

    async def stored() -> bool | None:
        rows = await chaos.stored_rows()
        last["rows"] = rows
        ends = await chaos.end_offsets(METRICS)
        return True if rows is not None and await chaos.writer_behind(ends) == 0 else None

    try:
        await eventually(stored, what="every sample stored", within=STORED_SECONDS, interval=2)
    except ChaosError as exc:
        log(f"  {exc} ({last['rows']} rows): checking what there is")
    log(f"replay over: {published} quotes published, {last['rows']} rows stored")


def _raw_sample(value: bytes) -> Sample:
    quote = decode(value, RawQuote)
    event_time = quote.event_time()
    assert event_time is not None, f"a quote without event time on cmc.quotes.raw: {quote.id}"
    return quote.id, event_time


def _row_observed(row: asyncpg.Record) -> Observed:
    coverage = orjson.loads(row["coverage"] or "{}")
    return Observed(
        row["cmc_id"],
        row["timestamp"],
        float(row["velocity"]),
        float(row["velocity_24h"]),
        {name: row[f"velocity_{name}"] for name in ("1h", "4h", "12h", "7d")},
        {n: (w.get("points_used"), w.get("points_expected")) for n, w in coverage.items()},
        row["trend"],
    )


async def _velocity_answers(chaos: Chaos, cmc_ids: Iterable[int]) -> list[Observed]:
    answers = []
    for cmc_id in sorted(cmc_ids):
        url = f"http://127.0.0.1:{chaos.ports.gateway}/v1/tokens/{cmc_id}/velocity"
        async with chaos.http.get(
            url, headers={"X-API-Key": chaos.key}, timeout=aiohttp.ClientTimeout(total=30)
        ) as response:
            body = orjson.loads(await response.read())
            if response.status != 200:
                raise ChaosError(f"GET {url}: HTTP {response.status} {body}")
        answers.append(Observed.of_velocity_answer(body["data"]))
    return answers


def _newest_comparison(seen: list[Observed], replay: Replay, where: str) -> Comparison:
    """``seen`` must hold each token's newest sample once, each as the reference has it."""
    problems = [
        f"{where}: cmc_id {o.cmc_id} at {o.ts}, its newest is "
        f"{replay.newest[o.cmc_id].ts if o.cmc_id in replay.newest else 'none'}"
        for o in seen
        if o.cmc_id not in replay.newest or o.ts != replay.newest[o.cmc_id].ts
    ]
    missing = replay.newest.keys() - {o.cmc_id for o in seen}
    problems += [f"{where}: no answer for cmc_id {cmc_id}" for cmc_id in sorted(missing)]
    numbers = compare(seen, replay)
    return Comparison(
        len(replay.newest),
        numbers.differing + len(problems),
        problems + numbers.problems,
    )


def _state_figure(name: str, comparison: Comparison) -> Figure:
    for line in comparison.problems[:SHOWN]:
        log(f"  {line}")
    return Figure(
        name,
        f"{comparison.differing} of {comparison.compared}",
        "0",
        comparison.compared > 0 and comparison.differing == 0,
    )


async def check(chaos: Chaos) -> list[Figure]:
    """Every figure of the final accounting (the stack still up, the load stopped)."""
    log("reading cmc.quotes.raw, token.metrics and the dead letters back")
    raw = await read_records(chaos.bootstrap, chaos.topic(RAW_QUOTES), within=READ_SECONDS)
    raw_samples = Counter(_raw_sample(value) for _, value in raw if value is not None)
    published = set(raw_samples)
    metrics = await read_records(chaos.bootstrap, chaos.topic(METRICS), within=READ_SECONDS)
    metric_samples = Counter(
        (s.cmc_id, s.ts) for s in (decode(v, MetricsSample) for _, v in metrics if v is not None)
    )
    dead = await read_records(chaos.bootstrap, chaos.topic(DEAD_LETTERS), within=READ_SECONDS)

    log("recomputing the replay offline from the recording")
    rows = await asyncio.to_thread(
        replayed_rows, chaos.replayed.recording, chaos.replayed.snapshots
    )
    everything = await asyncio.to_thread(expected_replay, rows)
    never_published = everything.samples.keys() - published
    reference = everything
    if never_published:
        kept = [row for row in rows if sample_of(row) in published]
        reference = await asyncio.to_thread(expected_replay, kept)
    skipped_snapshots = sorted({row["ts"] for row in rows if sample_of(row) in never_published})

    log("reading token_metrics and token_latest")
    conn = await asyncpg.connect(chaos.database_dsn, timeout=30)
    try:
        stored_rows = await conn.fetch(SELECT_ROWS, timeout=300)
        latest_rows = await conn.fetch(SELECT_LATEST, timeout=60)
    finally:
        await conn.close()
    stored = Counter((row["cmc_id"], row["timestamp"]) for row in stored_rows)
    lost = published - stored.keys()
    extra_rows = sum(n - 1 for n in stored.values()) + sum(
        n for sample, n in stored.items() if sample not in published
    )
    rows_state = await asyncio.to_thread(compare, map(_row_observed, stored_rows), reference)
    latest = [Observed.of_sample(decode(row["sample"], MetricsSample)) for row in latest_rows]
    latest_state = _newest_comparison(latest, reference, "token_latest")
    log("asking the gateway for every token's velocity")
    answers = await _velocity_answers(chaos, reference.newest)
    rest_state = _newest_comparison(answers, reference, "REST")

    ingestor_kills = len(chaos.kills.get("ingestor", []))
    for sample in sorted(lost)[:SHOWN]:
        log(f"  lost: {sample}")
    return [
        Figure("samples replayed (unique)", f"{len(everything.samples)}", "-", True),
        Figure(
            "not published: fetched by an ingestor then killed",
            f"{len(never_published)} samples in {len(skipped_snapshots)} snapshots",
            f"≤ 1 snapshot per ingestor kill ({ingestor_kills})",
            len(skipped_snapshots) <= ingestor_kills,
        ),
        Figure(
            "quotes published twice on cmc.quotes.raw",
            f"{sum(raw_samples.values()) - len(raw_samples)}",
            "0",
            sum(raw_samples.values()) == len(raw_samples),
        ),
        Figure("dead letters", f"{len(dead)}", "0", not dead),
        Figure(
            "samples on token.metrics more than once (the writer skips them)",
            f"{sum(metric_samples.values()) - len(metric_samples)}",
            "-",
            True,
        ),
        Figure(
            "samples lost (published, not in token_metrics)",
            f"{len(lost)} of {len(published)}",
            "0",
            bool(published) and not lost,
        ),
        Figure(
            "duplicated or unexpected rows in token_metrics",
            f"{extra_rows} of {sum(stored.values())}",
            "0",
            extra_rows == 0,
        ),
        _state_figure("token_metrics rows ≠ offline recomputation", rows_state),
        _state_figure("token_latest ≠ offline recomputation", latest_state),
        _state_figure("REST /velocity ≠ offline recomputation", rest_state),
    ]
