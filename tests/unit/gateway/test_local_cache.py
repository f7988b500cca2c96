"""The in-process answer cache: when it serves, what drops it, and answers rendered ahead of time
that are byte for byte what the response models answer."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from api_gateway.cache_aside import render_token, render_velocity, token_detail, velocity_data
from api_gateway.handlers.common import freshness, json_response, rendered_response
from api_gateway.local_cache import LocalCache, Rendered
from api_gateway.models import Meta, Source, TokenResponse, VelocityResponse
from tokvel_common.cache import VELOCITY_TIMEFRAMES, TokenMetadata, velocity_snapshot
from tokvel_common.events import MetricsSample, WindowCoverage
from tokvel_common.invalidation import Invalidation

AS_OF = datetime(2017, 8, 10, 0, 0, 5, tzinfo=UTC)
ANSWER = Rendered(b'{"token":{"cmc_id":1}}', AS_OF, b'"2017-08-10T00:00:05Z"')


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def live_cache(ttl: float = 1.0) -> tuple[LocalCache, Clock, asyncio.Event]:
    clock = Clock()
    cache = LocalCache(ttl, clock=clock)
    subscribed = asyncio.Event()
    subscribed.set()
    cache.attach(subscribed)
    return cache, clock, subscribed


def test_an_answer_is_served_until_its_ttl() -> None:
    cache, clock, _ = live_cache(ttl=1.0)
    cache.put("token", 1, ANSWER, cache.generation)
    assert cache.get("token", 1) is ANSWER
    assert cache.get("velocity", 1) is None
    clock.now += 0.999
    assert cache.get("token", 1) is ANSWER
    clock.now += 0.001
    assert cache.get("token", 1) is None
    assert len(cache) == 0


def test_an_announcement_drops_both_answers_of_the_tokens_it_names() -> None:
    cache, _, _ = live_cache()
    for cmc_id in (1, 2):
        cache.put("token", cmc_id, ANSWER, cache.generation)
        cache.put("velocity", cmc_id, ANSWER, cache.generation)
    cache.invalidate(Invalidation(kind="metrics", cmc_ids=[1]))
    assert cache.get("token", 1) is None and cache.get("velocity", 1) is None
    assert cache.get("token", 2) is ANSWER and cache.get("velocity", 2) is ANSWER
    cache.invalidate(Invalidation(kind="token_info", cmc_ids=[2]))
    assert len(cache) == 0


def test_a_value_read_while_an_announcement_arrived_is_not_kept() -> None:
    """The GET may have answered the old value: the writer SETs, then announces."""
    cache, _, _ = live_cache()
    before_read = cache.generation
    cache.invalidate(Invalidation(kind="metrics", cmc_ids=[2]))  # any token: we cannot tell
    cache.put("token", 1, ANSWER, before_read)
    assert cache.get("token", 1) is None
    cache.put("token", 1, ANSWER, cache.generation)
    assert cache.get("token", 1) is ANSWER


def test_nothing_is_served_or_kept_without_a_subscription() -> None:
    cache, _, subscribed = live_cache()
    cache.put("token", 1, ANSWER, cache.generation)
    subscribed.clear()  # the listener lost its connection: announcements may be missed
    assert not cache.enabled
    assert cache.get("token", 1) is None
    cache.put("token", 2, ANSWER, cache.generation)
    # Subscribed again: the listener resets first (everything from before is dropped).
    cache.reset()
    subscribed.set()
    assert cache.get("token", 1) is None and cache.get("token", 2) is None
    unattached = LocalCache(1.0)
    unattached.put("token", 1, ANSWER, unattached.generation)
    assert unattached.get("token", 1) is None
    switched_off, _, _ = live_cache(ttl=0.0)
    switched_off.put("token", 1, ANSWER, switched_off.generation)
    assert switched_off.get("token", 1) is None


def _sample() -> MetricsSample:
    return MetricsSample(
        cmc_id=1,
        symbol="BTC",
        name="Bitcoin",
        slug="bitcoin",
        cmc_rank=1,
        ts=AS_OF,
        price_usd=3441.92,
        market_cap_usd=56787463627,
        volume_24h_usd=1560180000,
        circulating_supply=16498762,
        total_supply=None,
        max_supply=21000000,
        percent_change_1h=-0.14,
        percent_change_24h=1.5e-7,
        percent_change_7d=1234567.125,
        velocity=0.02747463,
        velocity_1h=0.0274,
        velocity_4h=None,
        velocity_12h=0.03,
        velocity_24h=0.02747463,
        velocity_7d=None,
        coverage={"1h": WindowCoverage(points_used=12, points_expected=12)},
        trend="insufficient_data",
        data_quality_score=0.95,
        quality_flags=["stale"],
    )


def test_a_rendered_answer_is_what_the_response_model_answers() -> None:
    metadata = TokenMetadata(cmc_id=1, symbol="BTC", name="Bitcoin", slug="bitcoin", cmc_rank=1)
    sample = _sample()
    now = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)
    cases: list[tuple[MetricsSample | None, Source]] = [(sample, "cache"), (None, "database")]
    for with_sample, source in cases:
        as_of = with_sample.ts if with_sample else None
        meta = Meta(as_of=as_of, age_s=freshness(as_of, now), source=source)
        model = TokenResponse(data=token_detail(metadata, with_sample), meta=meta)
        answer = rendered_response(render_token(metadata, with_sample), source, now)
        assert answer.body == model.model_dump_json(by_alias=True).encode()
        assert answer.content_type == json_response(model).content_type
    velocity = velocity_data([velocity_snapshot(sample, tf) for tf in VELOCITY_TIMEFRAMES])
    meta = Meta(as_of=AS_OF, age_s=freshness(AS_OF, now), source="cache")
    answer = rendered_response(render_velocity(velocity), "cache", now)
    expected = VelocityResponse(data=velocity, meta=meta).model_dump_json(by_alias=True)
    assert answer.body == expected.encode()
