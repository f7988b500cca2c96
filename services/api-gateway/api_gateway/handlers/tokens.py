"""``/v1/tokens``: the ranking, one token, its velocity, its history."""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import urlencode

from aiohttp import web

from api_gateway.errors import bad_request, not_found
from api_gateway.handlers.common import (
    apply_rate_headers,
    freshness,
    json_response,
    parse_cmc_id,
    parse_query,
    rendered_response,
)
from api_gateway.models import (
    MAX_CSV_ROWS,
    MAX_HISTORY_LIMIT,
    HistoryMeta,
    HistoryPoint,
    HistoryQuery,
    HistoryResponse,
    Interval,
    TokenListMeta,
    TokenListQuery,
    TokenListResponse,
)
from api_gateway.repository import (
    DEFAULT_ORDER,
    HISTORY_COLUMNS,
    INTERVALS,
    UNAVAILABLE_ERRORS,
    HistoryRange,
    history_point,
)
from api_gateway.state import READER, REPOSITORY

log = logging.getLogger(__name__)

# -------------------------------------------------------------------------------- /v1/tokens


def _isoformat(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def list_tokens(request: web.Request) -> web.Response:
    query = parse_query(request, TokenListQuery)
    order = query.order or DEFAULT_ORDER[query.sort]
    ranking, source = await request.app[READER].ranking(
        query.sort, order, query.limit, query.offset, query.as_of
    )
    next_link = None
    if query.offset + len(ranking.items) < ranking.total and ranking.items:
        params: dict[str, str | int] = {
            "sort": query.sort,
            "order": order,
            "limit": query.limit,
            "offset": query.offset + query.limit,
        }
        if ranking.as_of is not None:
            params["as_of"] = _isoformat(ranking.as_of)
        next_link = f"{request.path}?{urlencode(params)}"
    return json_response(
        TokenListResponse(
            data=ranking.items,
            meta=TokenListMeta(
                as_of=ranking.as_of,
                age_s=freshness(ranking.as_of),
                source=source,
                total=ranking.total,
                limit=query.limit,
                offset=query.offset,
                sort=query.sort,
                order=order,
                next=next_link,
            ),
        )
    )


# ----------------------------------------------------------------------- /v1/tokens/{cmc_id}


def _no_query(request: web.Request) -> None:
    if request.query:
        name = next(iter(request.query))
        raise bad_request(f"unknown parameter {name!r}", "invalid_parameter")


async def get_token(request: web.Request) -> web.Response:
    cmc_id = parse_cmc_id(request)
    _no_query(request)
    rendered, source = await request.app[READER].token(cmc_id)
    return rendered_response(rendered, source)


async def get_velocity(request: web.Request) -> web.Response:
    cmc_id = parse_cmc_id(request)
    _no_query(request)
    rendered, source = await request.app[READER].velocity(cmc_id)
    return rendered_response(rendered, source)


# --------------------------------------------------------------- /v1/tokens/{cmc_id}/history

DEFAULT_JSON_LIMIT: Final = 1_000
# Ranges are bounded so that one answer is bounded: at a 1-minute poll, 31 days of raw samples
# are 44 640 rows; every bucketed range holds at most about 10 000 buckets.
MAX_RANGE: Final[dict[Interval, timedelta]] = {
    "raw": timedelta(days=31),
    "5m": timedelta(days=31),
    "1h": timedelta(days=366),
    "1d": timedelta(days=3660),
}
DEFAULT_SPAN: Final[dict[Interval, timedelta]] = {
    "raw": timedelta(days=1),
    "5m": timedelta(days=1),
    "1h": timedelta(days=7),
    "1d": timedelta(days=90),
}
BUCKET_ORIGIN: Final = datetime(2000, 1, 1, tzinfo=UTC)
MICROSECOND: Final = timedelta(microseconds=1)
_CURSOR_VERSION: Final = "c1"


def _floor(value: datetime, bucket: timedelta) -> datetime:
    return BUCKET_ORIGIN + ((value - BUCKET_ORIGIN) // bucket) * bucket


def _ceil(value: datetime, bucket: timedelta) -> datetime:
    floored = _floor(value, bucket)
    return floored if floored == value else floored + bucket


def _fingerprint(cmc_id: int, start: datetime, end: datetime, query: HistoryQuery) -> str:
    text = f"{cmc_id}|{start.isoformat()}|{end.isoformat()}|{query.interval}|{query.fill}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_cursor(page_start: datetime, fingerprint: str) -> str:
    micros = (page_start - BUCKET_ORIGIN) // MICROSECOND
    raw = f"{_CURSOR_VERSION}.{micros}.{fingerprint}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, fingerprint: str) -> datetime:
    """The page start a cursor carries; 400 when it is malformed or from another query."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        version, micros, their_fingerprint = raw.split(".")
        if version != _CURSOR_VERSION or len(micros) > 18:
            raise ValueError(version)
        page_start = BUCKET_ORIGIN + int(micros) * MICROSECOND
    except (ValueError, binascii.Error, OverflowError):
        raise bad_request("the cursor is not valid", "invalid_cursor") from None
    if their_fingerprint != fingerprint:
        raise bad_request(
            "the cursor belongs to another query: repeat the same from, to, interval and fill",
            "invalid_cursor",
        )
    return page_start


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return _isoformat(value)
    return str(value)


def _csv_lines(points: Iterable[HistoryPoint]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for point in points:
        writer.writerow([_cell(getattr(point, column)) for column in HISTORY_COLUMNS])
    return buffer.getvalue()


async def get_history(request: web.Request) -> web.StreamResponse:
    cmc_id = parse_cmc_id(request)
    query = parse_query(request, HistoryQuery)
    bucket = INTERVALS[query.interval]
    if bucket is None and query.fill != "none":
        raise bad_request("fill=linear needs an aggregated interval (5m, 1h, 1d)", "invalid_fill")
    if query.format == "csv" and query.cursor is not None:
        raise bad_request("CSV answers the whole range: no cursor", "invalid_parameter")
    repository = request.app[REPOSITORY]
    row = await repository.token(cmc_id)
    if row is None:
        raise not_found(f"no token with cmc_id {cmc_id}", "token_not_found")
    as_of = row.latest_ts
    end = query.to or ((as_of + MICROSECOND) if as_of else datetime.now(UTC))
    start = query.from_ or (end - DEFAULT_SPAN[query.interval])
    if bucket is not None:
        start, end = _floor(start, bucket), _ceil(end, bucket)
    if start >= end:
        raise bad_request("from must be before to", "invalid_range")
    if end - start > MAX_RANGE[query.interval]:
        days = MAX_RANGE[query.interval].days
        raise bad_request(
            f"at most {days} days per request with interval={query.interval}", "range_too_large"
        )
    fingerprint = _fingerprint(cmc_id, start, end, query)
    page_start = start if query.cursor is None else decode_cursor(query.cursor, fingerprint)
    if not start <= page_start <= end:
        raise bad_request("the cursor is outside the range", "invalid_cursor")
    if query.format == "csv":
        limit = query.limit or MAX_CSV_ROWS
        history = HistoryRange(
            row.token_id, start, end, query.interval, query.fill, page_start, limit
        )
        return await _stream_csv(request, history, cmc_id, as_of)
    limit = query.limit or DEFAULT_JSON_LIMIT
    if limit > MAX_HISTORY_LIMIT:
        raise bad_request(f"limit is at most {MAX_HISTORY_LIMIT} for JSON", "invalid_parameter")
    points = await repository.history(
        HistoryRange(row.token_id, start, end, query.interval, query.fill, page_start, limit + 1)
    )
    next_cursor = next_link = None
    if len(points) > limit:
        points = points[:limit]
        following = points[-1].ts + (bucket or MICROSECOND)
        next_cursor = encode_cursor(following, fingerprint)
        params = {k: v for k, v in request.query.items() if k != "cursor"}
        params["cursor"] = next_cursor
        next_link = f"{request.path}?{urlencode(params)}"
    return json_response(
        HistoryResponse(
            data=points,
            meta=HistoryMeta(
                as_of=as_of,
                age_s=freshness(as_of),
                source="database",
                cmc_id=cmc_id,
                interval=query.interval,
                fill=query.fill,
                from_=start,
                to=end,
                count=len(points),
                next_cursor=next_cursor,
                next=next_link,
            ),
        )
    )


CSV_CHUNK_ROWS: Final = 500


async def _stream_csv(
    request: web.Request, query: HistoryRange, cmc_id: int, as_of: datetime | None
) -> web.StreamResponse:
    repository = request.app[REPOSITORY]
    async with repository.history_stream(query) as rows:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="token-{cmc_id}-history.csv"',
                "X-Data-As-Of": _isoformat(as_of) if as_of else "",
                "X-Data-Age-S": str(freshness(as_of) if as_of else ""),
            }
        )
        apply_rate_headers(request, response)
        await response.prepare(request)
        await response.write((",".join(HISTORY_COLUMNS) + "\n").encode())
        chunk: list[HistoryPoint] = []
        try:
            async for record in rows:
                chunk.append(history_point(record))
                if len(chunk) >= CSV_CHUNK_ROWS:
                    await response.write(_csv_lines(chunk).encode())
                    chunk.clear()
        except UNAVAILABLE_ERRORS:
            # The status is sent: the only honest signal left is a body cut short (no final
            # chunk), which every HTTP client reports as an error.
            log.warning("history stream aborted: database unavailable", exc_info=True)
            if request.transport is not None:
                request.transport.close()
            return response
        if chunk:
            await response.write(_csv_lines(chunk).encode())
        await response.write_eof()
    return response
