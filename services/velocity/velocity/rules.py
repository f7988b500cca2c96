"""The velocity processor's domain rules: pure functions, no I/O, no clock.

:func:`validate` turns one raw ``cmc.quotes.raw`` message into an :class:`Observation` or a
:class:`Rejection` with a machine-readable reason; :func:`apply` counts an observation in its
token's :class:`~tokvel_common.velocity_math.TokenWindows` and builds the enriched sample. Every
time they use comes from the message itself, so a replay produces what a live run produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

import orjson

from tokvel_common.events import SCHEMA_VERSION, CmcQuote, MetricsSample, Number, RawQuote
from tokvel_common.serialization import DecodeError, decode, encode, encode_key
from tokvel_common.velocity_math import (
    OUTLIER_HISTORY_POINTS,
    AddOutcome,
    TokenWindows,
    compute_trend,
    compute_velocity,
    score_quality,
)

# Machine-readable reasons of cmc.quotes.dlq, besides those of serialization.decode
# ("invalid_json" - which covers NaN, Infinity and numbers beyond the double range, since JSON has
# none of them -, "not_an_object", "schema_violation" for wrong types and missing fields).
MISSING_VALUE: Final = "missing_value"
KEY_MISMATCH: Final = "key_mismatch"
MISSING_USD_QUOTE: Final = "missing_usd_quote"
MISSING_LAST_UPDATED: Final = "missing_last_updated"
NEGATIVE_NUMBER: Final = "negative_number"
FUTURE_TIMESTAMP: Final = "future_timestamp"
TOO_LATE: Final = "too_late"

_DETAIL_LIMIT: Final = 2000


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str


# Observation and Applied are made once per quote: named tuples, immutable like a frozen
# dataclass, at half the cost to create (a frozen dataclass sets each field through
# object.__setattr__).


class Observation(NamedTuple):
    """A validated quote: the entry, its USD quote, its event time and the time it was listed."""

    key: bytes  # the Kafka key, which is the entry's id (encode_key)
    quote: RawQuote
    usd: CmcQuote
    ts: datetime  # last_updated: the event time of every window
    listed_at: datetime  # the answer's status.timestamp, else polled_at: freshness is judged here


class Applied(NamedTuple):
    """What :func:`apply` made of an observation.

    The sample is kept as the fields ``MetricsSample.model_dump()`` would give, built from
    values that are already of the model's types: validating them into the model and dumping
    them again (as ``serialization.encode`` does) would cost a third of the work per quote and
    change nothing (tests/unit/velocity/test_rules.py compares the bytes).
    """

    outcome: AddOutcome
    fields: dict[str, Any] | None  # only for an accepted observation
    newest: bool  # the sample is the token's newest (a late one never replaces it)

    @property
    def sample(self) -> MetricsSample | None:
        return None if self.fields is None else MetricsSample.model_validate(self.fields)

    def encoded(self) -> bytes:
        """The sample as ``serialization.encode(self.sample)`` writes it."""
        if self.fields is None:
            raise ValueError(f"a {self.outcome} observation has no sample")
        try:
            return orjson.dumps(self.fields)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits: encode() has the exact way
            return encode(MetricsSample.model_validate(self.fields))


def _negative_number(quote: RawQuote, usd: CmcQuote) -> str | None:
    """The first amount that cannot be negative but is (percent changes may be negative)."""
    amounts: tuple[tuple[str, Number | None], ...] = (
        ("price", usd.price),
        ("volume_24h", usd.volume_24h),
        ("market_cap", usd.market_cap),
        ("circulating_supply", quote.circulating_supply),
        ("total_supply", quote.total_supply),
        ("max_supply", quote.max_supply),
    )
    for name, value in amounts:
        if value is not None and value < 0:
            return f"{name} is {value}"
    return None


def validate(
    key: bytes | None, value: bytes | None, *, future_skew: timedelta
) -> Observation | Rejection:
    """One raw message as an observation, or why it goes to the dead-letter topic."""
    if value is None:
        return Rejection(MISSING_VALUE, "a tombstone (null value) is not a quote")
    try:
        quote = decode(value, RawQuote)
    except DecodeError as exc:
        return Rejection(exc.reason, exc.detail[:_DETAIL_LIMIT])
    if key is None or key != encode_key(quote.id):
        # The key decides the partition, and the partition the worker holding the token's state:
        # a quote under another key would be counted in a second, separate state.
        return Rejection(KEY_MISMATCH, f"key {key!r} is not the entry's id {quote.id}")
    usd = quote.quote_in("USD")
    if usd is None:
        return Rejection(MISSING_USD_QUOTE, "the entry has no USD quote")
    ts = quote.event_time()
    if ts is None:
        return Rejection(MISSING_LAST_UPDATED, "neither the USD quote nor the entry has one")
    negative = _negative_number(quote, usd)
    if negative is not None:
        return Rejection(NEGATIVE_NUMBER, negative)
    listed_at = quote.listed_at or quote.polled_at
    if ts - listed_at > future_skew:
        return Rejection(
            FUTURE_TIMESTAMP,
            f"last_updated {ts.isoformat()} is more than {future_skew} after "
            f"{listed_at.isoformat()}",
        )
    return Observation(key=key, quote=quote, usd=usd, ts=ts, listed_at=listed_at)


def apply(observation: Observation, windows: TokenWindows) -> Applied:
    """Count ``observation`` in ``windows`` (updated in place) and build its enriched sample.

    A duplicate (same ``last_updated`` as a counted sample) or a too-late sample (more than 12 h
    behind the newest) leaves ``windows`` unchanged and has no sample.
    """
    quote, usd, ts = observation.quote, observation.usd, observation.ts
    velocity = compute_velocity(usd.volume_24h, usd.market_cap)
    previous_newest = windows.newest_ts
    outcome = windows.add(ts, velocity.computable_velocity, usd.price)
    if outcome is not AddOutcome.ACCEPTED:
        return Applied(outcome, None, newest=False)
    history = windows.previous_computable(ts, OUTLIER_HISTORY_POINTS)
    trend = compute_trend(velocity.computable_velocity, history)
    quality = score_quality(
        velocity=velocity,
        price=usd.price,
        market_cap=usd.market_cap,
        volume_24h=usd.volume_24h,
        circulating_supply=quote.circulating_supply,
        percent_change_1h=usd.percent_change_1h,
        percent_change_24h=usd.percent_change_24h,
        percent_change_7d=usd.percent_change_7d,
        last_updated=ts,
        reference_time=observation.listed_at,
        velocity_history=history,
        price_one_hour_before=windows.price_one_hour_before(ts),
    )
    rolling = windows.windows()
    # MetricsSample's fields, in its order (its model_dump()).
    fields: dict[str, Any] = {
        "cmc_id": quote.id,
        "symbol": quote.symbol,
        "name": quote.name,
        "slug": quote.slug,
        "cmc_rank": quote.cmc_rank,
        "ts": ts,
        "price_usd": usd.price,
        "market_cap_usd": usd.market_cap,
        "volume_24h_usd": usd.volume_24h,
        "circulating_supply": quote.circulating_supply,
        "total_supply": quote.total_supply,
        "max_supply": quote.max_supply,
        "percent_change_1h": usd.percent_change_1h,
        "percent_change_24h": usd.percent_change_24h,
        "percent_change_7d": usd.percent_change_7d,
        "velocity": velocity.velocity,
        "velocity_1h": rolling.velocity_1h,
        "velocity_4h": rolling.velocity_4h,
        "velocity_12h": rolling.velocity_12h,
        "velocity_24h": velocity.velocity,
        "velocity_7d": rolling.velocity_7d,
        "coverage": {
            name: {"points_used": used, "points_expected": expected}
            for name, (used, expected) in rolling.coverage.items()
        },
        "trend": trend.trend,
        "trend_recent_avg": trend.recent_avg,
        "data_quality_score": quality.score,
        "quality_flags": quality.flags,
        "polled_at": quote.polled_at,
        "schema_version": SCHEMA_VERSION,
    }
    # add() accepted it, so a timestamp above the previous newest is a new newest millisecond.
    newest = previous_newest is None or ts > previous_newest
    return Applied(outcome, fields, newest=newest)
