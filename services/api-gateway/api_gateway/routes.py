"""The route table: each route's handler and everything its OpenAPI operation says about it.

One table drives both the router and ``/openapi.json`` (see :mod:`api_gateway.openapi`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from aiohttp import web
from pydantic import BaseModel

from api_gateway.handlers import dashboard, docs, symbols, tokens, usage
from api_gateway.models import (
    MAX_CMC_ID,
    MAX_SYMBOL_LENGTH,
    SYMBOL_PATTERN,
    HistoryQuery,
    HistoryResponse,
    SymbolResponse,
    TokenListQuery,
    TokenListResponse,
    TokenResponse,
    UsageResponse,
    VelocityResponse,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

API_PREFIX: Final = "/v1/"


@dataclass(frozen=True)
class PathParam:
    name: str
    schema: dict[str, object]
    description: str


CMC_ID: Final = PathParam(
    "cmc_id",
    {"type": "integer", "minimum": 1, "maximum": MAX_CMC_ID},
    "The token's CoinMarketCap id (Bitcoin is 1).",
)
SYMBOL: Final = PathParam(
    "symbol",
    {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_SYMBOL_LENGTH,
        "pattern": SYMBOL_PATTERN,
    },
    "A ticker symbol, case-insensitive.",
)


@dataclass(frozen=True)
class RouteSpec:
    path: str
    handler: Handler
    name: str
    summary: str
    response: type[BaseModel]
    query: type[BaseModel] | None = None
    path_params: tuple[PathParam, ...] = ()
    counted: bool = True  # counts against the rate limit and the monthly quota
    not_found: bool = True
    csv: bool = False
    description: str = ""
    tags: tuple[str, ...] = field(default=("tokens",))


API_ROUTES: Final = (
    RouteSpec(
        "/v1/tokens",
        tokens.list_tokens,
        "listTokens",
        "Tokens ranked by a metric",
        TokenListResponse,
        query=TokenListQuery,
        not_found=False,
        description="A page of the ranking. Ties are broken by cmc_id, so pages pinned to the "
        "same `as_of` never repeat or skip a token.",
    ),
    RouteSpec(
        "/v1/tokens/{cmc_id}",
        tokens.get_token,
        "getToken",
        "A token's metadata and latest metrics",
        TokenResponse,
        path_params=(CMC_ID,),
    ),
    RouteSpec(
        "/v1/tokens/{cmc_id}/velocity",
        tokens.get_velocity,
        "getVelocity",
        "A token's velocity: every window, its coverage, the trend and data quality",
        VelocityResponse,
        path_params=(CMC_ID,),
    ),
    RouteSpec(
        "/v1/tokens/{cmc_id}/history",
        tokens.get_history,
        "getHistory",
        "A token's time series, raw or aggregated",
        HistoryResponse,
        query=HistoryQuery,
        path_params=(CMC_ID,),
        csv=True,
        description="Aggregated in PostgreSQL; paged with `cursor` (JSON) or streamed whole "
        "(CSV). Ranges: raw and 5m up to 31 days, 1h up to 366, 1d up to 3660.",
    ),
    RouteSpec(
        "/v1/symbols/{symbol}",
        symbols.get_symbol,
        "getSymbol",
        "Every token with a symbol, by rank (symbols are not unique)",
        SymbolResponse,
        path_params=(SYMBOL,),
    ),
    RouteSpec(
        "/v1/usage",
        usage.get_usage,
        "getUsage",
        "Your usage and limits",
        UsageResponse,
        counted=False,
        not_found=False,
        tags=("account",),
        description="Does not count against your limits, so it also answers after a 429.",
    ),
)

UNCOUNTED_ROUTES: Final = frozenset(spec.name for spec in API_ROUTES if not spec.counted)


def setup_routes(app: web.Application) -> None:
    for spec in API_ROUTES:
        app.router.add_get(spec.path, spec.handler, name=spec.name)
    app.router.add_get("/openapi.json", docs.openapi_json, name="openapi")
    app.router.add_get("/docs", docs.docs_page, name="docs")
    app.router.add_get("/docs/init.js", docs.docs_init, name="docs_init")
    app.router.add_get("/docs/static/{name}", docs.docs_asset, name="docs_asset")
    app.router.add_get("/", dashboard.dashboard_page, name="dashboard")
    app.router.add_get(
        "/dashboard/config.json", dashboard.dashboard_config, name="dashboard_config"
    )
    app.router.add_get("/dashboard/{name}", dashboard.dashboard_asset, name="dashboard_asset")
