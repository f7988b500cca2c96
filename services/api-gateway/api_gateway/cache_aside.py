"""Cache-aside over the seed's Redis keys, with PostgreSQL behind it.

Hit: the value is served as the writer (or an earlier miss) stored it. Miss: PostgreSQL
(``tokens`` + ``token_latest``), then the keys are filled with the seed's TTLs from
:mod:`tokvel_common.cache`. Fills of ``token:``/``velocity:`` use SET NX: if the writer stored a
newer sample between our read and our write, the writer's value stays (its own writes are plain
SETs and always win). Redis failing or slow never fails a request: the answer comes from
PostgreSQL and the fill is skipped.

In front of Redis, token and velocity answers read from Redis are kept rendered in process
(:mod:`api_gateway.local_cache`, dropped on the writer's announcements), so a hot token costs no
Redis round trip at all.

Every read of a token also counts an access for the writer's predictive warming (in memory,
added to the ``token_access:{bucket}`` sorted sets once a second by :mod:`api_gateway.access`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Final

from api_gateway.access import AccessCounter
from api_gateway.errors import RedisUnavailable, not_found
from api_gateway.local_cache import AnswerKind, LocalCache, Rendered
from api_gateway.metrics import GatewayMetrics
from api_gateway.models import (
    ListPage,
    MetricsOut,
    Order,
    SortField,
    Source,
    TimeframeName,
    TokenDetail,
    TokenOut,
    TrendOut,
    VelocityData,
    WindowCoverageOut,
    WindowOut,
)
from api_gateway.redis_gate import RedisGate
from api_gateway.repository import GatewayRepository, Ranking, TokenRow
from tokvel_common.cache import (
    VELOCITY_TIMEFRAMES,
    TokenMetadata,
    TokenSnapshot,
    VelocitySnapshot,
    decode_value,
    encode_value,
    list_page_key,
    register_list_page,
    snapshot_entries,
    token_key,
    velocity_key,
    velocity_snapshot,
)
from tokvel_common.events import MetricsSample

log = logging.getLogger(__name__)

TREND_THRESHOLD: Final = 0.05  # ARCHITECTURE.md: the trend rule's 5 %


def list_sort_segment(sort: SortField, order: Order) -> str:
    """The ``{sort}`` of a page key: the field for ascending, ``-field`` for descending.

    No colon (the key is split on them), and a metadata sort in ascending order is the bare
    field name that :data:`tokvel_common.cache.METADATA_SORTS` recognises.
    """
    return sort if order == "asc" else f"-{sort}"


def velocity_data(snapshots: Sequence[VelocitySnapshot]) -> VelocityData:
    """The velocity answer from one snapshot per timeframe (each carries its own coverage)."""
    first = snapshots[0]
    windows: dict[TimeframeName, WindowOut] = {}
    for snapshot in snapshots:
        coverage = snapshot.coverage
        windows[snapshot.timeframe] = WindowOut(
            velocity=snapshot.velocity,
            points_used=coverage.points_used if coverage else None,
            points_expected=coverage.points_expected if coverage else None,
        )
    current = first.velocity_24h
    recent = first.trend_recent_avg
    change = (current - recent) / recent if recent else None
    return VelocityData(
        cmc_id=first.cmc_id,
        velocity=current,
        velocity_1h=first.velocity_1h,
        velocity_4h=first.velocity_4h,
        velocity_12h=first.velocity_12h,
        velocity_24h=first.velocity_24h,
        velocity_7d=first.velocity_7d,
        windows=windows,
        trend=TrendOut(
            direction=first.trend,
            current=current,
            recent_avg=recent,
            change_ratio=change,
            threshold=TREND_THRESHOLD,
        ),
        data_quality_score=first.data_quality_score,
        quality_flags=first.quality_flags,
        calculated_at=first.calculated_at,
    )


def token_detail(metadata: TokenMetadata, sample: MetricsSample | None) -> TokenDetail:
    """The token answer's ``data``: its metadata and latest metrics (null before any sample)."""
    metrics = None
    if sample is not None:
        metrics = MetricsOut(
            ts=sample.ts,
            cmc_rank=sample.cmc_rank,
            price_usd=sample.price_usd,
            market_cap_usd=sample.market_cap_usd,
            volume_24h_usd=sample.volume_24h_usd,
            circulating_supply=sample.circulating_supply,
            total_supply=sample.total_supply,
            max_supply=sample.max_supply,
            percent_change_1h=sample.percent_change_1h,
            percent_change_24h=sample.percent_change_24h,
            percent_change_7d=sample.percent_change_7d,
            velocity=sample.velocity,
            velocity_1h=sample.velocity_1h,
            velocity_4h=sample.velocity_4h,
            velocity_12h=sample.velocity_12h,
            velocity_24h=sample.velocity_24h,
            velocity_7d=sample.velocity_7d,
            coverage={
                name: WindowCoverageOut(
                    points_used=cov.points_used, points_expected=cov.points_expected
                )
                for name, cov in sample.coverage.items()
            },
            trend=sample.trend,
            data_quality_score=sample.data_quality_score,
            quality_flags=sample.quality_flags,
        )
    token = TokenOut(
        cmc_id=metadata.cmc_id,
        symbol=metadata.symbol,
        name=metadata.name,
        slug=metadata.slug,
        cmc_rank=metadata.cmc_rank,
        description=metadata.description,
        logo_url=metadata.logo_url,
        website_url=metadata.website_url,
        twitter_url=metadata.twitter_url,
        reddit_url=metadata.reddit_url,
        github_url=metadata.github_url,
        whitepaper_url=metadata.whitepaper_url,
        date_added=metadata.date_added,
        is_active=metadata.is_active,
    )
    return TokenDetail(token=token, metrics=metrics)


def render_token(metadata: TokenMetadata, sample: MetricsSample | None) -> Rendered:
    return Rendered.of(token_detail(metadata, sample), sample.ts if sample else None)


def render_velocity(data: VelocityData) -> Rendered:
    return Rendered.of(data, data.calculated_at)


class TokenReader:
    def __init__(
        self,
        gate: RedisGate,
        repository: GatewayRepository,
        metrics: GatewayMetrics,
        access: AccessCounter,
        local: LocalCache,
    ) -> None:
        self._gate = gate
        self._repository = repository
        self._metrics = metrics
        self._access = access
        self._local = local
        # Answers being read from Redis, for the requests that want the same one meanwhile.
        self._reads: dict[tuple[AnswerKind, int], asyncio.Future[Rendered | None]] = {}

    async def _get(self, keys: Sequence[str]) -> list[bytes | None]:
        """GET ``keys`` in one round trip; None for each on failure."""
        client = self._gate.client
        try:
            if len(keys) == 1:
                value = await self._gate.run("get", lambda: client.get(keys[0]))
                return [value.encode() if isinstance(value, str) else value]
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.get(key)
            return list(await self._gate.run("get", pipe.execute))
        except RedisUnavailable:
            return [None] * len(keys)

    async def _fill(self, snapshot: TokenSnapshot) -> None:
        pipe = self._gate.client.pipeline(transaction=False)
        for key, value, ttl in snapshot_entries(snapshot):
            pipe.set(key, value, ex=ttl, nx=True)
        with contextlib.suppress(RedisUnavailable):
            await self._gate.run("fill", pipe.execute)

    async def _from_database(self, cmc_id: int) -> TokenRow:
        row = await self._repository.token(cmc_id)
        if row is None:
            raise not_found(f"no token with cmc_id {cmc_id}", "token_not_found")
        if row.snapshot is not None:
            await self._fill(row.snapshot)
        return row

    async def _cached(
        self,
        kind: AnswerKind,
        cmc_id: int,
        read: Callable[[int], Awaitable[Rendered | None]],
    ) -> Rendered | None:
        """The answer from memory, else from Redis by ``read`` (then kept in memory); None when
        Redis does not hold it. One read per answer at a time: when an entry expires under
        load, the requests for it share one round trip instead of each paying their own."""
        self._access.record(cmc_id)
        # While Redis fails, announcements may not flow either: answer as without Redis.
        local = self._local.get(kind, cmc_id) if self._gate.available else None
        if local is not None:
            self._metrics.cache_lookup(kind, "hit")
            self._metrics.memory_hit(kind)
            return local
        key = (kind, cmc_id)
        pending = self._reads.get(key)
        if pending is not None:
            # shield: a waiter going away must not cancel the read the others wait for.
            shared = await asyncio.shield(pending)
            if shared is not None:
                self._metrics.cache_lookup(kind, "hit")
                self._metrics.memory_hit(kind)
            return shared
        pending = self._reads[key] = asyncio.get_running_loop().create_future()
        generation = self._local.generation
        rendered = None
        try:
            rendered = await read(cmc_id)
        finally:
            del self._reads[key]
            pending.set_result(rendered)  # None also when this read failed: each goes on alone
        if rendered is not None:
            self._metrics.cache_lookup(kind, "hit")
            self._local.put(kind, cmc_id, rendered, generation)
        return rendered

    async def _token_from_redis(self, cmc_id: int) -> Rendered | None:
        (raw,) = await self._get([token_key(cmc_id)])
        if raw is None:
            return None
        try:
            snapshot = decode_value(raw, TokenSnapshot)
        except (ValueError, zlib.error):
            log.warning("unreadable cache value", extra={"key": token_key(cmc_id)})
            return None
        return render_token(snapshot.token, snapshot.metrics)

    async def token(self, cmc_id: int) -> tuple[Rendered, Source]:
        """The ``data`` of ``GET /v1/tokens/{cmc_id}``, rendered."""
        rendered = await self._cached("token", cmc_id, self._token_from_redis)
        if rendered is not None:
            return rendered, "cache"
        self._metrics.cache_lookup("token", "miss")
        row = await self._from_database(cmc_id)
        sample = row.snapshot.metrics if row.snapshot else None
        return render_token(row.metadata, sample), "database"

    async def _velocity_from_redis(self, cmc_id: int) -> Rendered | None:
        keys = [velocity_key(cmc_id, tf) for tf in VELOCITY_TIMEFRAMES]
        raws = await self._get(keys)
        if any(raw is None for raw in raws):
            return None
        try:
            snapshots = [decode_value(raw, VelocitySnapshot) for raw in raws if raw]
        except (ValueError, zlib.error):
            log.warning("unreadable cache value", extra={"key": keys[0]})
            return None
        # Keys are written together, but expire or are refreshed one by one: serve them only
        # when they describe the same sample.
        if len({s.calculated_at for s in snapshots}) != 1:
            return None
        return render_velocity(velocity_data(snapshots))

    async def velocity(self, cmc_id: int) -> tuple[Rendered, Source]:
        """The ``data`` of ``GET /v1/tokens/{cmc_id}/velocity``, rendered."""
        rendered = await self._cached("velocity", cmc_id, self._velocity_from_redis)
        if rendered is not None:
            return rendered, "cache"
        self._metrics.cache_lookup("velocity", "miss")
        row = await self._from_database(cmc_id)
        if row.snapshot is None:
            raise not_found(f"token {cmc_id} has no velocity yet", "no_data")
        sample = row.snapshot.metrics
        snapshots = [velocity_snapshot(sample, tf) for tf in VELOCITY_TIMEFRAMES]
        return render_velocity(velocity_data(snapshots)), "database"

    async def ranking(
        self,
        sort: SortField,
        order: Order,
        limit: int,
        offset: int,
        as_of: datetime | None,
    ) -> tuple[Ranking, Source]:
        key = list_page_key(list_sort_segment(sort, order), limit, offset)
        (raw,) = await self._get([key])
        if raw is not None:
            try:
                page = decode_value(raw, ListPage)
            except (ValueError, zlib.error):
                log.warning("unreadable cache value", extra={"key": key})
            else:
                # A page pinned to a snapshot time is served from cache only when the cached
                # page is that snapshot.
                if as_of is None or page.as_of == as_of:
                    self._metrics.cache_lookup("list", "hit")
                    return Ranking(list(page.items), page.total, page.as_of), "cache"
        self._metrics.cache_lookup("list", "miss")
        ranking = await self._repository.ranking(sort, order, limit, offset, as_of)
        if as_of is None and ranking.items:
            value = encode_value(
                ListPage(items=ranking.items, total=ranking.total, as_of=ranking.as_of)
            )
            pipe = self._gate.client.pipeline(transaction=False)
            register_list_page(pipe, key, value, (item.cmc_id for item in ranking.items))
            with contextlib.suppress(RedisUnavailable):
                await self._gate.run("fill", pipe.execute)
        return ranking, "database"
