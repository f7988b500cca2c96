"""``/v1/usage``: the caller's usage and limits. Not counted itself, so it answers after a 429."""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from api_gateway.errors import bad_request
from api_gateway.handlers.common import json_response
from api_gateway.models import Meta, UsageData, UsageMonth, UsageResponse, UsageWindow
from api_gateway.quota import month_start, next_month_start
from api_gateway.state import DECISION, PRINCIPAL


async def get_usage(request: web.Request) -> web.Response:
    if request.query:
        raise bad_request(f"unknown parameter {next(iter(request.query))!r}", "invalid_parameter")
    principal = request[PRINCIPAL]
    decision = request[DECISION]
    now = datetime.now(UTC)
    return json_response(
        UsageResponse(
            data=UsageData(
                key_prefix=principal.key_prefix,
                name=principal.name,
                tier=principal.tier,
                minute=UsageWindow(
                    limit=decision.minute_limit,
                    used=decision.minute_used,
                    remaining=decision.minute_remaining,
                    reset_s=decision.minute_reset_s,
                ),
                month=UsageMonth(
                    limit=decision.month_limit,
                    used=decision.month_used,
                    remaining=decision.month_remaining,
                    period_start=month_start(now),
                    reset_at=next_month_start(now),
                ),
                limiter=decision.backend,
            ),
            meta=Meta(as_of=now, age_s=0.0, source="live"),
        )
    )
