"""The wire contract: pydantic models of every message and answer that crosses a service boundary.

CMC numbers arrive as JSON numbers (IEEE doubles, or integers). They are kept as received: an
integer stays an ``int`` (never coerced to a lossy float) and a double stays a ``float``, whose
shortest round-trip text is what PostgreSQL's ``numeric`` columns store. Nothing is rounded here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1


def _as_utc(value: datetime) -> datetime:
    """CMC timestamps are UTC; a naive one is read as UTC rather than local time."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]
# Smart-mode union: JSON integers stay int (exact, any size), JSON doubles stay float.
Number = int | float


class _Lenient(BaseModel):
    """CMC adds fields over time: keep unknown ones as received instead of rejecting the entry."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class CmcQuote(_Lenient):
    """One currency's quote of a listing entry (``quote[...]`` in v1 and v3)."""

    id: int | None = None  # v3 only: the convert currency's CMC id (2781 = USD)
    symbol: str | None = None  # v3 only: the convert currency ("USD")
    price: Number | None = None
    volume_24h: Number | None = None
    volume_change_24h: Number | None = None
    percent_change_1h: Number | None = None
    percent_change_24h: Number | None = None
    percent_change_7d: Number | None = None
    percent_change_30d: Number | None = None
    market_cap: Number | None = None
    market_cap_dominance: Number | None = None
    fully_diluted_market_cap: Number | None = None
    last_updated: UtcDatetime | None = None


class CmcListingEntry(_Lenient):
    """One entry of ``/v3`` (``quote`` a list) or ``/v1`` (``quote`` a map) listings/latest."""

    id: int
    name: str | None = None
    symbol: str | None = None
    slug: str | None = None
    cmc_rank: int | None = None
    num_market_pairs: int | None = None
    circulating_supply: Number | None = None
    total_supply: Number | None = None
    max_supply: Number | None = None
    infinite_supply: bool | None = None
    last_updated: UtcDatetime | None = None
    date_added: UtcDatetime | None = None
    tags: list[Any] | None = None
    platform: dict[str, Any] | None = None
    quote: list[CmcQuote] | dict[str, CmcQuote] = Field(default_factory=dict)

    def quote_in(self, currency: str = "USD") -> CmcQuote | None:
        """The quote in ``currency`` whichever API version produced the entry."""
        if isinstance(self.quote, dict):
            return self.quote.get(currency)
        for candidate in self.quote:
            if candidate.symbol == currency:
                return candidate
        return None

    def event_time(self) -> datetime | None:
        """When CMC last updated this token's USD numbers: the event time of every window."""
        usd = self.quote_in("USD")
        if usd is not None and usd.last_updated is not None:
            return usd.last_updated
        return self.last_updated


class CmcStatus(_Lenient):
    """The ``status`` envelope of every CMC Pro API answer."""

    timestamp: UtcDatetime
    error_code: int = 0
    error_message: str | None = None
    elapsed: int | None = None
    credit_count: int = 0
    notice: str | None = None
    total_count: int | None = None


class CmcListingsResponse(_Lenient):
    status: CmcStatus
    data: list[CmcListingEntry]


class CmcErrorResponse(_Lenient):
    status: CmcStatus


class RawQuote(CmcListingEntry):
    """Value of ``cmc.quotes.raw``: one listing entry as received plus where it came from."""

    polled_at: UtcDatetime
    source: str
    poll_id: str
    # `status.timestamp` of the CMC answer that carried the entry (for a backfilled recording,
    # its snapshot time): the event-time "now" that freshness is measured against, so a replay
    # scores exactly as living through the same data did. None when the source had none.
    listed_at: UtcDatetime | None = None


class TokenInfo(_Lenient):
    """Value of ``cmc.tokens.info``: a token's metadata from ``/v2/cryptocurrency/info``."""

    cmc_id: int
    symbol: str | None = None
    name: str | None = None
    slug: str | None = None
    description: str | None = None
    logo_url: str | None = None
    website_url: str | None = None
    twitter_url: str | None = None
    reddit_url: str | None = None
    github_url: str | None = None
    whitepaper_url: str | None = None
    date_added: UtcDatetime | None = None
    fetched_at: UtcDatetime


class DeadLetter(BaseModel):
    """Value of ``cmc.quotes.dlq``: the rejected message, untouched, and why it was rejected."""

    model_config = ConfigDict(frozen=True)

    reason: str  # machine-readable code, e.g. "invalid_json", "negative_number"
    detail: str
    raw: str  # the original value, decoded as UTF-8 with replacement
    topic: str
    partition: int | None = None
    offset: int | None = None
    rejected_at: UtcDatetime


Trend = Literal["increasing", "decreasing", "stable", "insufficient_data"]
WindowName = Literal["1h", "4h", "12h", "7d"]


class WindowCoverage(BaseModel):
    model_config = ConfigDict(frozen=True)

    points_used: int = Field(ge=0)
    points_expected: int = Field(ge=0)


class MetricsSample(BaseModel):
    """Value of ``token.metrics`` and ``token.metrics.latest``: one enriched sample."""

    model_config = ConfigDict(frozen=True)

    cmc_id: int
    symbol: str | None
    name: str | None
    slug: str | None
    cmc_rank: int | None = None
    ts: UtcDatetime  # event time: the quote's last_updated
    price_usd: Number | None
    market_cap_usd: Number | None
    volume_24h_usd: Number | None
    circulating_supply: Number | None
    total_supply: Number | None
    max_supply: Number | None
    percent_change_1h: Number | None
    percent_change_24h: Number | None
    percent_change_7d: Number | None
    velocity: float
    velocity_1h: float | None
    velocity_4h: float | None
    velocity_12h: float | None
    velocity_24h: float
    velocity_7d: float | None
    coverage: dict[WindowName, WindowCoverage]
    trend: Trend
    trend_recent_avg: float | None = None
    data_quality_score: float = Field(ge=0, le=1)
    quality_flags: list[str]
    polled_at: UtcDatetime | None = None
    schema_version: int = SCHEMA_VERSION
