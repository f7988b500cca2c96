"""What the stack must output for a replayed recording, computed independently from the file.

Used by the end-to-end test (``tests/e2e/test_full_stack.py``) and the chaos suite
(``tests/chaos``): both replay a recording through the whole stack and compare every way out of
it with this.

``velocity`` by ``velocity_of`` and ``trend`` by ``trend_of`` of the velocity suite's reference
(``tests/integration/velocity/reference.py``, plain Python written from ARCHITECTURE.md); the
windows here, as exact rationals: the mean of the computable velocities (the 8-decimal numbers
they are) whose event minute (hour, for 7 d) lies in the window that ends at the sample's own
minute (hour), both edges included. The recording gives each token at most one sample per
snapshot, in event-time order, so every sample is its token's newest when it is computed.

Precision: ``velocity`` and ``velocity_24h`` are compared exactly: the contract rounds them to 8
decimals, and the double nearest that decimal is what every store keeps (``numeric(12,8)``
included). The contract does not round a window mean; it must lie within 1e-15 (relative) of the
exact mean. The service adds doubles (``math.fsum``) and divides, which rounds at most three
times by 2^-53 (about 3.3e-16 in all); one sample too many or too few in a window moves the mean
far more than that, unless that sample equals the mean, and ``points_used`` is compared exactly.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from tests.integration.velocity.reference import trend_of, velocity_of
from tests.support.recorded import recorded_rows
from tokvel_common.commands.stack_cmd import DEMO_EXPECTED_INTERVAL_SECONDS
from tokvel_common.events import MetricsSample

WINDOW_MINUTES = {"1h": 60, "4h": 240, "12h": 720}
WEEK_HOURS = 168
WINDOWS = ("1h", "4h", "12h", "7d")
WINDOW_SECONDS = {"1h": 3_600, "4h": 14_400, "12h": 43_200, "7d": 604_800}
MS_MINUTE, MS_HOUR = 60_000, 3_600_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
VELOCITY_DECIMALS = 8
MEAN_RELATIVE_TOLERANCE = Fraction(1, 10**15)
SHOWN = 10  # differences listed in a failure message

Sample = tuple[int, datetime]  # (cmc_id, event time): a sample's identity everywhere


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def sample_of(row: Mapping[str, Any]) -> Sample:
    """A recorded row's identity; the replay server's rule: the snapshot time when the
    recording has no last_updated."""
    return row["cmc_id"], parse_time(row["last_updated"] or row["ts"])


def velocity_units(velocity: float) -> int:
    """The 8-decimal number a velocity stands for, as an integer number of 1e-8 (exact)."""
    units = Decimal(repr(velocity)).scaleb(VELOCITY_DECIMALS)
    assert units == units.to_integral_value(), f"{velocity!r} has more than 8 decimals"
    return int(units)


@dataclass(frozen=True)
class Window:
    mean: Fraction | None
    points_used: int


@dataclass(frozen=True)
class ExpectedSample:
    cmc_id: int
    ts: datetime
    velocity: float
    computable: bool
    windows: Mapping[str, Window]
    trend: str


@dataclass
class _TokenHistory:
    """One token's computable samples so far, in event-time order, with running unit sums."""

    newest_ms: int | None = None
    times: list[int] = field(default_factory=list)
    unit_sums: list[int] = field(default_factory=lambda: [0])
    velocities: list[float] = field(default_factory=list)

    def add(self, ms: int, velocity: float) -> None:
        self.times.append(ms)
        self.unit_sums.append(self.unit_sums[-1] + velocity_units(velocity))
        self.velocities.append(velocity)

    def window(self, start_ms: int) -> Window:
        """The computable samples from ``start_ms`` on (none is newer than the newest)."""
        first = bisect.bisect_left(self.times, start_ms)
        used = len(self.times) - first
        units = self.unit_sums[-1] - self.unit_sums[first]
        mean = Fraction(units, used * 10**VELOCITY_DECIMALS) if used else None
        return Window(mean, used)


@dataclass(frozen=True)
class Replay:
    samples: Mapping[Sample, ExpectedSample]
    newest: Mapping[int, ExpectedSample]  # each token's newest sample
    last_snapshot: frozenset[int]  # the tokens of the last snapshot served


def replayed_rows(path: Path, snapshots: int | None = None) -> list[dict[str, Any]]:
    """The rows of the first ``snapshots`` snapshots (all by default): what the replay server
    serves."""
    rows: list[dict[str, Any]] = []
    times: list[str] = []
    for row in recorded_rows(path, "", "~"):  # every row: snapshot times sort as strings
        if not times or row["ts"] != times[-1]:
            if len(times) == snapshots:
                break
            times.append(row["ts"])
        rows.append(row)
    assert snapshots is None or len(times) == snapshots, (
        f"{path} has {len(times)} snapshots, not {snapshots}"
    )
    return rows


def expected_replay(rows: Iterable[dict[str, Any]]) -> Replay:
    histories: dict[int, _TokenHistory] = {}
    samples: dict[Sample, ExpectedSample] = {}
    last_ts, last_snapshot = "", set[int]()
    for row in rows:
        if row["ts"] != last_ts:
            last_ts, last_snapshot = row["ts"], set()
        last_snapshot.add(row["cmc_id"])
        key = sample_of(row)
        if key in samples:
            continue  # the same (cmc_id, last_updated) counts once
        ts = key[1]
        ms = (ts - EPOCH) // timedelta(milliseconds=1)
        history = histories.setdefault(row["cmc_id"], _TokenHistory())
        assert history.newest_ms is None or ms > history.newest_ms, "not in event-time order"
        velocity, not_computable = velocity_of(row["volume_24h_usd"], row["market_cap_usd"])
        current = None if not_computable else velocity
        trend, _ = trend_of(current, history.velocities[-3:])
        if current is not None:
            history.add(ms, current)
        history.newest_ms = ms
        windows = {
            name: history.window((ms // MS_MINUTE - minutes) * MS_MINUTE)
            for name, minutes in WINDOW_MINUTES.items()
        }
        windows["7d"] = history.window((ms // MS_HOUR - WEEK_HOURS) * MS_HOUR)
        samples[key] = ExpectedSample(
            row["cmc_id"], ts, velocity, current is not None, windows, trend
        )
    newest: dict[int, ExpectedSample] = {}
    for sample in samples.values():
        newest[sample.cmc_id] = sample  # in event-time order per token: the last one wins
    return Replay(samples, newest, frozenset(last_snapshot))


# ---------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Observed:
    """The numbers of one sample as one of the stack's outputs shows them."""

    cmc_id: int
    ts: datetime
    velocity: float
    velocity_24h: float
    means: Mapping[str, float | None]
    coverage: Mapping[str, tuple[int | None, int | None]]  # points used, expected
    trend: str

    @classmethod
    def of_sample(cls, sample: MetricsSample) -> Observed:
        means = {
            "1h": sample.velocity_1h,
            "4h": sample.velocity_4h,
            "12h": sample.velocity_12h,
            "7d": sample.velocity_7d,
        }
        coverage: dict[str, tuple[int | None, int | None]] = {
            name: (window.points_used, window.points_expected)
            for name, window in sample.coverage.items()
        }
        return cls(
            sample.cmc_id,
            sample.ts,
            sample.velocity,
            sample.velocity_24h,
            means,
            coverage,
            sample.trend,
        )

    @classmethod
    def of_velocity_answer(cls, data: Mapping[str, Any]) -> Observed:
        """``data`` of ``GET /v1/tokens/{cmc_id}/velocity``."""
        windows = data["windows"]
        return cls(
            data["cmc_id"],
            parse_time(data["calculated_at"]),
            data["velocity"],
            data["velocity_24h"],
            {name: data[f"velocity_{name}"] for name in WINDOWS},
            {n: (windows[n]["points_used"], windows[n]["points_expected"]) for n in WINDOWS},
            data["trend"]["direction"],
        )


def mean_matches(served: float | None, exact: Fraction | None) -> bool:
    if exact is None or served is None:
        return served is None and exact is None
    return abs(Fraction(served) - exact) <= exact * MEAN_RELATIVE_TOLERANCE


def differences(seen: Observed, want: ExpectedSample) -> list[str]:
    found = []
    if (seen.velocity, seen.velocity_24h) != (want.velocity, want.velocity):
        found.append(
            f"velocity {seen.velocity!r} / velocity_24h {seen.velocity_24h!r}, "
            f"expected {want.velocity!r}"
        )
    for name, window in want.windows.items():
        served = seen.means[name]
        if not mean_matches(served, window.mean):
            exact = None if window.mean is None else float(window.mean)
            found.append(f"velocity_{name} {served!r}, expected {exact!r} ({window.mean})")
        coverage = (window.points_used, WINDOW_SECONDS[name] // DEMO_EXPECTED_INTERVAL_SECONDS)
        if seen.coverage.get(name) != coverage:
            found.append(f"{name} coverage {seen.coverage.get(name)}, expected {coverage}")
    if seen.trend != want.trend:
        found.append(f"trend {seen.trend}, expected {want.trend}")
    return [f"cmc_id {want.cmc_id} at {want.ts:%Y-%m-%dT%H:%M:%SZ}: {d}" for d in found]


@dataclass(frozen=True)
class Comparison:
    """How a set of observed samples compares with the reference."""

    compared: int
    differing: int  # samples with at least one difference (unknown samples included)
    problems: list[str]  # every difference, one line each

    def summary(self, where: str) -> str:
        return (
            f"{where}: {self.differing} of {self.compared} samples differ from the reference; "
            f"the first {SHOWN} differences:\n" + "\n".join(self.problems[:SHOWN])
        )


def compare(seen: Iterable[Observed], replay: Replay) -> Comparison:
    problems: list[str] = []
    compared = differing = 0
    for item in seen:
        compared += 1
        want = replay.samples.get((item.cmc_id, item.ts))
        found = (
            [f"cmc_id {item.cmc_id} at {item.ts}: not a replayed sample"]
            if want is None
            else differences(item, want)
        )
        differing += bool(found)
        problems.extend(found)
    return Comparison(compared, differing, problems)


def assert_match(seen: Iterable[Observed], replay: Replay, where: str) -> None:
    comparison = compare(seen, replay)
    assert not comparison.problems, comparison.summary(where)
