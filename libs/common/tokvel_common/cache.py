"""The Redis cache contract: key names, TTLs, value models and codec, list-page invalidation.

The writer fills the cache; the API gateway and the WebSocket broadcaster read it. All three use
this module, so a key or a value shape is defined once.

Keys (ARCHITECTURE.md -> Redis keys; the braces below are placeholders, not hash tags):

====================================  =======  ================================================
key                                   TTL      value
====================================  =======  ================================================
``token:{token_id}``                  60 s     :class:`TokenSnapshot` (metadata + latest sample)
``velocity:{token_id}:{timeframe}``   300 s    :class:`VelocitySnapshot`, timeframe in
                                               :data:`VELOCITY_TIMEFRAMES`
``tokens:list:{sort}:{limit}:{offset}``  300 s  a page of token summaries (the gateway's shape)
``tokens:list:index``                 300 s    hash: page key -> cmc ids on the page
``token_access:{bucket}``             15 min   sorted set: cmc id -> reads in a 5-minute bucket
``tokvel:cache:warm``                 none     sentinel written after each warm-up
``ws_subs:{token_id}``                none     the broadcaster's subscriber sets
====================================  =======  ================================================

``token_id`` is the public CMC id. Values are compact JSON (orjson); a value longer than
:data:`COMPRESSION_THRESHOLD_BYTES` is stored as :data:`ZLIB_MARKER` followed by its zlib stream.
JSON text never starts with that byte, so :func:`decode_value` reads both forms and a reader
never needs to know the threshold.

Eviction: production Redis runs with ``maxmemory`` and ``maxmemory-policy volatile-lru``. Under
memory pressure only keys that carry a TTL are candidates, so the un-expiring keys above
(``ws_subs:*``, the warm sentinel) can never be evicted, while every cache key (all with a TTL)
can; ``allkeys-*`` would silently drop live WebSocket subscriptions, and ``noeviction`` would
turn a full cache into failed writes.

Redis Cluster: no key carries a hash tag, because no operation spans two keys. Writers send
pipelines of single-key commands without MULTI, which redis-py splits per node; a reader that
needs several keys (the velocity of several timeframes, say) pipelines GETs the same way. Should
an atomic multi-key operation ever be needed, tag the token id (``token:{1}``,
``velocity:{1}:1h``) so a token's keys share a slot.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, TypeVar, get_args

import orjson
from pydantic import BaseModel, ConfigDict

from tokvel_common.events import MetricsSample, Trend, UtcDatetime, WindowCoverage
from tokvel_common.redis_client import RedisPipeline

TOKEN_TTL_SECONDS: Final = 60
VELOCITY_TTL_SECONDS: Final = 300
LIST_TTL_SECONDS: Final = 300

Timeframe = Literal["1h", "4h", "12h", "24h", "7d"]
VELOCITY_TIMEFRAMES: Final[tuple[Timeframe, ...]] = get_args(Timeframe)

# Pages registry: the writer must find the pages a change affects without SCAN, which would walk
# the whole keyspace (and every node of a cluster). Its TTL is refreshed with every page added,
# so it outlives every page it lists.
LIST_INDEX_KEY: Final = "tokens:list:index"

# Written without a TTL after each warm-up: under volatile-lru it is never evicted, so its
# absence means FLUSHALL or a restart that lost the data set, and the cache must be warmed again.
WARM_SENTINEL_KEY: Final = "tokvel:cache:warm"

ACCESS_BUCKET_SECONDS: Final = 300
ACCESS_TTL_SECONDS: Final = 3 * ACCESS_BUCKET_SECONDS

# Small values stay plain JSON: below about 1 KiB zlib saves little and costs CPU on every read.
COMPRESSION_THRESHOLD_BYTES: Final = 1024
ZLIB_MARKER: Final = b"\x00"

ModelT = TypeVar("ModelT", bound=BaseModel)


def token_key(cmc_id: int) -> str:
    return f"token:{cmc_id}"


def velocity_key(cmc_id: int, timeframe: Timeframe) -> str:
    return f"velocity:{cmc_id}:{timeframe}"


def list_page_key(sort: str, limit: int, offset: int) -> str:
    return f"tokens:list:{sort}:{limit}:{offset}"


def ws_subs_key(cmc_id: int) -> str:
    return f"ws_subs:{cmc_id}"


def access_bucket_key(epoch_seconds: float) -> str:
    """The popularity bucket a read at ``epoch_seconds`` (wall time) counts in."""
    return f"token_access:{int(epoch_seconds) // ACCESS_BUCKET_SECONDS}"


def recent_access_bucket_keys(epoch_seconds: float) -> tuple[str, str]:
    """The current and the previous bucket: together the last 5 to 10 minutes of reads."""
    return (
        access_bucket_key(epoch_seconds),
        access_bucket_key(epoch_seconds - ACCESS_BUCKET_SECONDS),
    )


# ------------------------------------------------------------------------------------- codec


def encode_value(model: BaseModel) -> bytes:
    data = orjson.dumps(model.model_dump(mode="python"))
    if len(data) <= COMPRESSION_THRESHOLD_BYTES:
        return data
    compressed = zlib.compress(data)
    # Some JSON (already dense) does not shrink: storing it compressed would only cost reads.
    return ZLIB_MARKER + compressed if len(compressed) + 1 < len(data) else data


def decode_value(data: bytes | str, model: type[ModelT]) -> ModelT:
    """Either form of :func:`encode_value` (``str`` only from a client that decodes responses,
    which can hold plain JSON only)."""
    if isinstance(data, str):
        data = data.encode()
    if data[:1] == ZLIB_MARKER:
        data = zlib.decompress(data[1:])
    return model.model_validate_json(data)


# ------------------------------------------------------------------------------------ values


class TokenMetadata(BaseModel):
    """A token's row of ``tokens``, as the API shows it (without the internal id)."""

    model_config = ConfigDict(frozen=True)

    cmc_id: int
    symbol: str | None = None
    name: str | None = None
    slug: str | None = None
    cmc_rank: int | None = None
    description: str | None = None
    logo_url: str | None = None
    website_url: str | None = None
    twitter_url: str | None = None
    reddit_url: str | None = None
    github_url: str | None = None
    whitepaper_url: str | None = None
    date_added: UtcDatetime | None = None
    is_active: bool = True
    updated_at: UtcDatetime | None = None


class TokenSnapshot(BaseModel):
    """Value of ``token:{token_id}``: everything ``GET /v1/tokens/{cmc_id}`` answers."""

    model_config = ConfigDict(frozen=True)

    token: TokenMetadata
    metrics: MetricsSample


class VelocitySnapshot(BaseModel):
    """Value of ``velocity:{token_id}:{timeframe}``.

    ``velocity`` and ``coverage`` are the timeframe's own (24h is the instantaneous ratio, with
    no coverage); every window is included too, so any one key answers
    ``GET /v1/tokens/{cmc_id}/velocity`` by itself.
    """

    model_config = ConfigDict(frozen=True)

    cmc_id: int
    timeframe: Timeframe
    velocity: float | None
    coverage: WindowCoverage | None
    velocity_1h: float | None
    velocity_4h: float | None
    velocity_12h: float | None
    velocity_24h: float
    velocity_7d: float | None
    trend: Trend
    trend_recent_avg: float | None
    data_quality_score: float
    quality_flags: list[str]
    calculated_at: UtcDatetime


def velocity_snapshot(sample: MetricsSample, timeframe: Timeframe) -> VelocitySnapshot:
    windows: dict[Timeframe, float | None] = {
        "1h": sample.velocity_1h,
        "4h": sample.velocity_4h,
        "12h": sample.velocity_12h,
        "24h": sample.velocity_24h,
        "7d": sample.velocity_7d,
    }
    return VelocitySnapshot(
        cmc_id=sample.cmc_id,
        timeframe=timeframe,
        velocity=windows[timeframe],
        coverage=None if timeframe == "24h" else sample.coverage.get(timeframe),
        velocity_1h=sample.velocity_1h,
        velocity_4h=sample.velocity_4h,
        velocity_12h=sample.velocity_12h,
        velocity_24h=sample.velocity_24h,
        velocity_7d=sample.velocity_7d,
        trend=sample.trend,
        trend_recent_avg=sample.trend_recent_avg,
        data_quality_score=sample.data_quality_score,
        quality_flags=sample.quality_flags,
        calculated_at=sample.ts,
    )


def snapshot_entries(snapshot: TokenSnapshot) -> list[tuple[str, bytes, int]]:
    """Every ``(key, value, ttl_seconds)`` one token's latest state is cached under."""
    cmc_id = snapshot.token.cmc_id
    entries = [(token_key(cmc_id), encode_value(snapshot), TOKEN_TTL_SECONDS)]
    entries.extend(
        (
            velocity_key(cmc_id, tf),
            encode_value(velocity_snapshot(snapshot.metrics, tf)),
            VELOCITY_TTL_SECONDS,
        )
        for tf in VELOCITY_TIMEFRAMES
    )
    return entries


# ------------------------------------------------------------------------------- list pages

# Sorts by a field of the token's metadata: their order changes only when tokens are added or
# renamed. Every other sort (velocity, market cap, volume, rank...) depends on the metrics.
METADATA_SORTS: Final = frozenset({"cmc_id", "id", "symbol", "name", "slug", "date_added"})


@dataclass
class CacheChange:
    """What a batch changed, as far as cached list pages are concerned."""

    metrics: set[int] = field(default_factory=set)  # cmc ids with a new sample
    metadata: set[int] = field(default_factory=set)  # cmc ids whose tokens row changed
    tokens_added: bool = False

    @property
    def ids(self) -> set[int]:
        return self.metrics | self.metadata

    def merge(self, other: CacheChange) -> None:
        self.metrics |= other.metrics
        self.metadata |= other.metadata
        self.tokens_added = self.tokens_added or other.tokens_added

    def __bool__(self) -> bool:
        return bool(self.metrics or self.metadata or self.tokens_added)


def list_page_sort(page_key: str) -> str | None:
    """The ``sort`` of ``tokens:list:{sort}:{limit}:{offset}``, or None for another key."""
    parts = page_key.split(":")
    if len(parts) != 5 or parts[:2] != ["tokens", "list"]:
        return None
    return parts[2]


def encode_page_ids(cmc_ids: Iterable[int]) -> bytes:
    return ",".join(str(i) for i in cmc_ids).encode("ascii")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode_page_ids(data: bytes | str) -> set[int]:
    return {int(part) for part in _text(data).split(",") if part}


# Keys and values as a client returns them: bytes, or str with decode_responses.
PageIndex = Mapping[bytes | str, bytes | str]


def list_pages_to_drop(index: PageIndex, change: CacheChange) -> list[bytes | str]:
    """The registered pages whose content or membership ``change`` may alter.

    A page is dropped when a token on it changed; when it is sorted by a metric and any token
    has a new sample (membership and order move); when it is sorted by metadata and tokens were
    added or renamed. Unknown sorts count as metric sorts: dropping too much only costs a query.
    """
    if not change:
        return []
    changed = change.ids
    dropped: list[bytes | str] = []
    for page_key, page_ids in index.items():
        sort = list_page_sort(_text(page_key))
        if sort is None:
            dropped.append(page_key)  # not a page: clean the registry
        elif sort in METADATA_SORTS:
            if (
                change.tokens_added
                or change.metadata
                or not changed.isdisjoint(decode_page_ids(page_ids))
            ):
                dropped.append(page_key)
        elif change.metrics or not changed.isdisjoint(decode_page_ids(page_ids)):
            dropped.append(page_key)
    return dropped


def register_list_page(
    pipe: RedisPipeline, page_key: str, value: bytes, cmc_ids: Iterable[int]
) -> None:
    """Queue the commands that cache a list page (a reader of this module calls this)."""
    pipe.set(page_key, value, ex=LIST_TTL_SECONDS)
    pipe.hset(LIST_INDEX_KEY, page_key, encode_page_ids(cmc_ids))
    pipe.expire(LIST_INDEX_KEY, LIST_TTL_SECONDS)


def record_access(pipe: RedisPipeline, cmc_id: int, epoch_seconds: float) -> None:
    """Queue the commands that count one read of a token (the gateway calls this per read)."""
    key = access_bucket_key(epoch_seconds)
    pipe.zincrby(key, 1, str(cmc_id))
    pipe.expire(key, ACCESS_TTL_SECONDS)
