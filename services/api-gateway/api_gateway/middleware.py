"""The two middlewares: ``observe`` (outermost: request id, errors as JSON, metrics) and ``guard``
(``/v1/``: API key, then rate limit and quota)."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler

from api_gateway.auth import API_KEY_HEADER
from api_gateway.errors import ApiError, DatabaseUnavailable, database_unavailable
from api_gateway.handlers.common import apply_rate_headers, json_response
from api_gateway.models import ErrorBody, ErrorResponse
from api_gateway.routes import API_PREFIX, UNCOUNTED_ROUTES
from api_gateway.state import AUTHENTICATOR, DECISION, LIMITER, METRICS, PRINCIPAL, REQUEST_ID

log = logging.getLogger(__name__)

REQUEST_ID_HEADER: Final = "X-Request-Id"
_REQUEST_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HTTP_CODES: Final = {
    404: ("not_found", "no such resource"),
    405: ("method_not_allowed", "method not allowed"),
    413: ("payload_too_large", "request body too large"),
}


def error_response(status: int, code: str, message: str) -> web.Response:
    return json_response(ErrorResponse(error=ErrorBody(code=code, message=message)), status)


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    code, message = _HTTP_CODES.get(exc.status, (f"http_{exc.status}", exc.reason))
    response = error_response(exc.status, code, message)
    allow = exc.headers.get("Allow")
    if allow:
        response.headers["Allow"] = allow
    return response


def _route_name(request: web.Request) -> str:
    route = request.match_info.route
    return route.name or ("unmatched" if request.match_info.http_exception else "other")


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = supplied if _REQUEST_ID_PATTERN.match(supplied) else secrets.token_hex(16)
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    response: web.StreamResponse
    try:
        if request.body_exists and request.match_info.http_exception is None:
            # Every operation is a GET without a body: refuse one unread (never buffered,
            # whatever its size or shape) rather than ignore it.
            raise ApiError(413, "payload_too_large", "this API takes no request body")
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers)
    except DatabaseUnavailable:
        request.app[METRICS].db_errors.inc()
        unavailable = database_unavailable()
        response = error_response(unavailable.status, unavailable.code, unavailable.message)
        response.headers.update(unavailable.headers)
    except web.HTTPException as exc:
        response = _from_http_exception(exc)
    except Exception:
        # Logged with the request id; the client gets the id, never the trace.
        log.exception("unhandled error", extra={"request_id": request_id, "path": request.path})
        response = error_response(500, "internal_error", f"internal error (request {request_id})")
    if not response.prepared:
        apply_rate_headers(request, response)
        response.headers[REQUEST_ID_HEADER] = request_id
    request.app[METRICS].request_done(
        _route_name(request), request.method, response.status, time.perf_counter() - started
    )
    return response


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every ``/v1/`` request (unknown paths too) is authenticated and counted first."""
    if not request.path.startswith(API_PREFIX):
        return await handler(request)
    principal = await request.app[AUTHENTICATOR].authenticate(request.headers.get(API_KEY_HEADER))
    request[PRINCIPAL] = principal
    counted = request.match_info.route.name not in UNCOUNTED_ROUTES
    decision = await request.app[LIMITER].check(principal, count=counted)
    request[DECISION] = decision
    if not decision.allowed:
        if decision.reason == "month":
            raise ApiError(
                429, "quota_exceeded", f"monthly quota of {decision.month_limit} requests used up"
            )
        raise ApiError(
            429, "rate_limited", f"more than {decision.minute_limit} requests in this minute"
        )
    return await handler(request)
