"""The REST API's wire contract: query parameters and every response body, as pydantic models.

``/openapi.json`` is generated from these models (see :mod:`api_gateway.openapi`), so the
documentation and what the handlers validate and answer cannot drift apart.

Numbers are kept as they were received from CMC: an integer stays an integer and a double a
double (``int | float``), never a rounded string.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Final, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from tokvel_common.events import Trend

Number = int | float
Source = Literal["cache", "database", "live"]
SortField = Literal[
    "market_cap",
    "volume_24h",
    "velocity",
    "velocity_7d",
    "price",
    "percent_change_24h",
    "symbol",
    "name",
    "rank",
]
Order = Literal["asc", "desc"]
Interval = Literal["raw", "5m", "1h", "1d"]
Fill = Literal["none", "linear"]
Format = Literal["json", "csv"]
TimeframeName = Literal["1h", "4h", "12h", "24h", "7d"]

MAX_LIST_LIMIT: Final = 500
MAX_LIST_OFFSET: Final = 1_000_000
MAX_HISTORY_LIMIT: Final = 10_000
MAX_CSV_ROWS: Final = 100_000
MAX_CURSOR_LENGTH: Final = 128
MAX_CMC_ID: Final = 2**63 - 1  # bigint
MAX_SYMBOL_LENGTH: Final = 64
# No control characters (C0, DEL, C1): PostgreSQL text cannot hold NUL, and none is in a symbol.
SYMBOL_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]+$"

# Outside these years a date is a mistake (and date arithmetic near year 1 or 9999 overflows).
# The year is checked as written, before conversion to UTC, so that the published pattern says
# exactly what is accepted (1970-01-01T00:00+01:00 is accepted, being 1969 only in UTC).
EARLIEST_YEAR: Final = 1970
LATEST_YEAR: Final = 2999
# ISO 8601 text only (pydantic alone would also take a number as Unix time): a calendar date
# in those years, then the rest of a date-time.
QUERY_DATETIME_PATTERN: Final = r"^(19[7-9][0-9]|2[0-9]{3})-"
_QUERY_DATETIME = re.compile(QUERY_DATETIME_PATTERN)


def _iso_text(value: object) -> object:
    if isinstance(value, str) and _QUERY_DATETIME.match(value) is None:
        raise ValueError(f"must be an ISO 8601 date-time in {EARLIEST_YEAR}-{LATEST_YEAR}")
    return value


def _utc_in_range(value: datetime) -> datetime:
    if not EARLIEST_YEAR <= value.year <= LATEST_YEAR:
        raise ValueError(f"must be an ISO 8601 date-time in {EARLIEST_YEAR}-{LATEST_YEAR}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


QueryDatetime = Annotated[
    datetime,
    BeforeValidator(_iso_text),
    AfterValidator(_utc_in_range),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": QUERY_DATETIME_PATTERN}),
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


# ------------------------------------------------------------------------------------ queries


class _Query(BaseModel):
    # Unknown parameters are refused rather than ignored: a typo must not go unnoticed.
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TokenListQuery(_Query):
    sort: SortField = Field(default="market_cap", description="Field to sort by.")
    order: Order | None = Field(
        default=None,
        description="Sort direction; by default descending for numbers, ascending for "
        "symbol, name and rank. Ties are broken by cmc_id (ascending), nulls come last.",
    )
    limit: int = Field(default=50, ge=1, le=MAX_LIST_LIMIT, description="Page size.")
    offset: int = Field(default=0, ge=0, le=MAX_LIST_OFFSET, description="Tokens to skip.")
    as_of: QueryDatetime | None = Field(
        default=None,
        description="Page through the ranking as it was at this time (ISO 8601): pass "
        "`meta.as_of` of the first page (the `meta.next` links do) and later pages never "
        "repeat or skip a token, however the ranking moves meanwhile.",
    )


class HistoryQuery(_Query):
    from_: QueryDatetime | None = Field(
        default=None,
        alias="from",
        description="Start (inclusive, ISO 8601); default `to` minus 24 hours. Floored to the "
        "interval for aggregated intervals.",
    )
    to: QueryDatetime | None = Field(
        default=None,
        description="End (exclusive, ISO 8601); default just after the token's newest sample.",
    )
    interval: Interval = Field(
        default="raw", description="`raw` samples, or averages per 5 minutes, hour or day."
    )
    fill: Fill = Field(
        default="none",
        description="`linear` adds interpolated points (marked `interpolated`) for empty "
        "buckets between two buckets with data; only for aggregated intervals.",
    )
    format: Format = Field(default="json", description="`csv` streams the same rows as CSV.")
    limit: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CSV_ROWS,
        description=f"Points per page (JSON: default 1000, at most {MAX_HISTORY_LIMIT}; CSV: "
        f"default and at most {MAX_CSV_ROWS}).",
    )
    cursor: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CURSOR_LENGTH,
        description="`meta.next_cursor` of the previous page, with the same other parameters.",
    )


# ------------------------------------------------------------------------------------- errors


class ErrorBody(_Frozen):
    code: str = Field(description="Stable, machine-readable.")
    message: str = Field(description="For humans.")


class ErrorResponse(_Frozen):
    error: ErrorBody


# --------------------------------------------------------------------------------------- meta


class Meta(_Frozen):
    as_of: datetime | None = Field(
        description="Event time (CMC's last_updated) of the newest data this answer reflects."
    )
    age_s: float | None = Field(description="Seconds between `as_of` and when this was sent.")
    source: Source = Field(description="Where the data came from: Redis, PostgreSQL, or live.")


# ----------------------------------------------------------------------------------- /v1/tokens


class TokenSummary(_Frozen):
    cmc_id: int
    symbol: str | None
    name: str | None
    slug: str | None
    cmc_rank: int | None
    ts: datetime = Field(description="Event time of the token's sample shown.")
    price_usd: Number | None
    market_cap_usd: Number | None
    volume_24h_usd: Number | None
    percent_change_24h: Number | None
    velocity: float
    velocity_7d: float | None
    trend: Trend
    data_quality_score: float


class TokenListMeta(Meta):
    total: int = Field(description="Tokens in the ranking.")
    limit: int
    offset: int
    sort: SortField
    order: Order
    next: str | None = Field(description="Link to the next page (pinned to `as_of`), or null.")


class TokenListResponse(_Frozen):
    data: list[TokenSummary]
    meta: TokenListMeta


class ListPage(_Frozen):
    """Value of a cached ``tokens:list:{sort}:{limit}:{offset}`` page."""

    items: list[TokenSummary]
    total: int
    as_of: datetime | None


# ----------------------------------------------------------------------- /v1/tokens/{cmc_id}


class TokenOut(_Frozen):
    cmc_id: int
    symbol: str | None
    name: str | None
    slug: str | None
    cmc_rank: int | None
    description: str | None
    logo_url: str | None
    website_url: str | None
    twitter_url: str | None
    reddit_url: str | None
    github_url: str | None
    whitepaper_url: str | None
    date_added: datetime | None
    is_active: bool


class WindowCoverageOut(_Frozen):
    points_used: int
    points_expected: int


class MetricsOut(_Frozen):
    ts: datetime = Field(description="Event time: CMC's last_updated of this sample.")
    cmc_rank: int | None
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
    coverage: dict[str, WindowCoverageOut]
    trend: Trend
    data_quality_score: float
    quality_flags: list[str]


class TokenDetail(_Frozen):
    token: TokenOut
    metrics: MetricsOut | None = Field(description="Null until the token's first sample.")


class TokenResponse(_Frozen):
    data: TokenDetail
    meta: Meta


# -------------------------------------------------------------- /v1/tokens/{cmc_id}/velocity


class WindowOut(_Frozen):
    velocity: float | None = Field(description="Null when the window has no computable sample.")
    points_used: int | None = Field(description="Null for 24h (an instantaneous ratio).")
    points_expected: int | None


class TrendOut(_Frozen):
    direction: Trend
    current: float = Field(description="The newest velocity, compared with `recent_avg`.")
    recent_avg: float | None = Field(description="Mean of the 3 previous computable samples.")
    change_ratio: float | None = Field(description="(current - recent_avg) / recent_avg.")
    threshold: float = Field(description="|change_ratio| above this is a trend.")


class VelocityData(_Frozen):
    cmc_id: int
    velocity: float
    velocity_1h: float | None
    velocity_4h: float | None
    velocity_12h: float | None
    velocity_24h: float
    velocity_7d: float | None
    windows: dict[TimeframeName, WindowOut]
    trend: TrendOut
    data_quality_score: float
    quality_flags: list[str]
    calculated_at: datetime = Field(description="Event time of the sample computed.")


class VelocityResponse(_Frozen):
    data: VelocityData
    meta: Meta


# --------------------------------------------------------------- /v1/tokens/{cmc_id}/history


class HistoryPoint(_Frozen):
    ts: datetime = Field(description="Sample time (raw) or bucket start.")
    samples: int = Field(description="Samples in the bucket (0 for an interpolated point).")
    interpolated: bool
    price_usd: Number | None
    market_cap_usd: Number | None
    volume_24h_usd: Number | None
    velocity: float | None = Field(description="Mean of the computable samples' velocity.")
    velocity_min: float | None
    velocity_max: float | None
    velocity_1h: float | None
    velocity_4h: float | None
    velocity_12h: float | None
    velocity_7d: float | None
    data_quality_score: float | None


class HistoryMeta(Meta):
    model_config = ConfigDict(populate_by_name=True)

    cmc_id: int
    interval: Interval
    fill: Fill
    from_: datetime = Field(alias="from")
    to: datetime
    count: int = Field(description="Points in this page.")
    next_cursor: str | None
    next: str | None


class HistoryResponse(_Frozen):
    data: list[HistoryPoint]
    meta: HistoryMeta


# --------------------------------------------------------------------- /v1/symbols/{symbol}


class SymbolMatch(_Frozen):
    cmc_id: int
    symbol: str | None
    name: str | None
    slug: str | None
    cmc_rank: int | None
    is_active: bool
    ts: datetime | None
    price_usd: Number | None
    market_cap_usd: Number | None
    velocity: float | None


class SymbolMeta(Meta):
    symbol: str
    total: int


class SymbolResponse(_Frozen):
    data: list[SymbolMatch]
    meta: SymbolMeta


# ------------------------------------------------------------------------------------ /v1/usage


class UsageWindow(_Frozen):
    limit: int
    used: int
    remaining: int
    reset_s: int = Field(description="Seconds until the window starts again.")


class UsageMonth(_Frozen):
    limit: int
    used: int
    remaining: int
    period_start: date
    reset_at: datetime


class UsageData(_Frozen):
    key_prefix: str
    name: str
    tier: str
    minute: UsageWindow
    month: UsageMonth
    limiter: Literal["redis", "local"] = Field(
        description="`local` while Redis is unavailable: per-replica limits apply."
    )


class UsageResponse(_Frozen):
    data: UsageData
    meta: Meta
