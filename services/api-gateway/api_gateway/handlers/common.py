"""What every handler shares: strict parameter parsing, freshness, JSON answers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, TypeAdapter, ValidationError

from api_gateway.errors import bad_request
from api_gateway.local_cache import Rendered
from api_gateway.models import MAX_CMC_ID, Source
from api_gateway.state import DECISION

QueryT = TypeVar("QueryT", bound=BaseModel)

_AGE: Final = TypeAdapter(float | None)  # serialized as Meta.age_s is

JSON_CONTENT_TYPE = "application/json"


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "query"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _fix_plus(value: str) -> str:
    # An unencoded "+" of a UTC offset arrives as a space ("...T00:00:00 00:00").
    if len(value) > 6 and value[-6] == " " and value[-3] == ":":
        return value[:-6] + "+" + value[-5:]
    return value


def parse_query(request: web.Request, model: type[QueryT]) -> QueryT:
    """The query string as ``model``: unknown or repeated parameters, bad values -> 400."""
    params: dict[str, str] = {}
    for name, value in request.query.items():
        if name in params:
            raise bad_request(f"parameter {name!r} is given more than once", "invalid_parameter")
        params[name] = _fix_plus(value)
    try:
        return model.model_validate(params)
    except ValidationError as exc:
        raise bad_request(_describe(exc), "invalid_parameter") from None


def parse_cmc_id(request: web.Request) -> int:
    raw = request.match_info["cmc_id"]
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise bad_request("cmc_id must be a positive integer", "invalid_cmc_id")
    value = int(raw)
    if not 1 <= value <= MAX_CMC_ID:
        raise bad_request("cmc_id is out of range", "invalid_cmc_id")
    return value


def freshness(as_of: datetime | None, now: datetime | None = None) -> float | None:
    """Seconds since ``as_of`` (never negative: clocks of other machines may run ahead)."""
    if as_of is None:
        return None
    now = now or datetime.now(UTC)
    return round(max(0.0, (now - as_of).total_seconds()), 3)


def json_response(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=model.model_dump_json(by_alias=True),
        status=status,
        content_type=JSON_CONTENT_TYPE,
    )


def rendered_response(
    rendered: Rendered, source: Source, now: datetime | None = None
) -> web.Response:
    """``{"data": ..., "meta": ...}`` around an already rendered ``data``: byte for byte what
    :func:`json_response` answers for the same response model (:class:`Meta`, its fields in
    order, the age serialized by pydantic), without building one per request."""
    age_s = _AGE.dump_json(freshness(rendered.as_of, now))
    return web.Response(
        body=b'{"data":%b,"meta":{"as_of":%b,"age_s":%b,"source":"%b"}}'
        % (rendered.data_json, rendered.as_of_json, age_s, source.encode()),
        content_type=JSON_CONTENT_TYPE,
    )


def apply_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    decision = request.get(DECISION)
    if decision is not None:
        response.headers.update(decision.headers())
