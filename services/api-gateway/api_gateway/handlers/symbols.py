"""``/v1/symbols/{symbol}``: every token with that symbol (symbols collide), by rank."""

from __future__ import annotations

import re
from typing import Final

from aiohttp import web

from api_gateway.errors import bad_request, not_found
from api_gateway.handlers.common import freshness, json_response
from api_gateway.models import MAX_SYMBOL_LENGTH, SYMBOL_PATTERN, SymbolMeta, SymbolResponse
from api_gateway.state import REPOSITORY

MAX_MATCHES: Final = 100
_SYMBOL: Final = re.compile(SYMBOL_PATTERN)


async def get_symbol(request: web.Request) -> web.Response:
    symbol = request.match_info["symbol"]
    if not 1 <= len(symbol) <= MAX_SYMBOL_LENGTH or _SYMBOL.match(symbol) is None:
        raise bad_request(
            f"symbol must be 1 to {MAX_SYMBOL_LENGTH} characters, none a control character",
            "invalid_symbol",
        )
    if request.query:
        raise bad_request(f"unknown parameter {next(iter(request.query))!r}", "invalid_parameter")
    matches = await request.app[REPOSITORY].by_symbol(symbol, MAX_MATCHES)
    if not matches:
        raise not_found(f"no token with symbol {symbol!r}", "symbol_not_found")
    times = [m.ts for m in matches if m.ts is not None]
    as_of = max(times) if times else None
    return json_response(
        SymbolResponse(
            data=matches,
            meta=SymbolMeta(
                as_of=as_of,
                age_s=freshness(as_of),
                source="database",
                symbol=symbol,
                total=len(matches),
            ),
        )
    )
