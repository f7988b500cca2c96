"""``tokvel run cmc-replay``: a CMC Pro API that serves recorded real data.

It answers ``GET /v3`` and ``/v1/cryptocurrency/listings/latest`` and ``/v2/cryptocurrency/info``
like CMC: the same parameters (``start``, ``limit``, ``convert``, ``sort``, ``sort_dir``,
``aux``), shapes, types, status envelope, API-key check, paging, ``total_count`` and
``credit_count``, and CMC's error bodies. Every full sweep of the listings (the page that reaches
the end of the list) moves on to the next recorded snapshot, so a fast poller replays a week in
minutes; after the last snapshot it keeps serving that one.

Faults for tests are armed by ``--fault`` / ``REPLAY_FAULTS`` or at runtime through
``POST /_replay/faults`` (see :mod:`ingestor.replay_faults`); ``GET /_replay/state`` tells where
the replay is, ``POST /_replay/reset`` starts it over.

Its answers are CMC's JSON, not tokvel messages, so they are written with orjson here rather
than through ``tokvel_common.serialization``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from ingestor.replay_data import (
    ALL_AUX,
    DEFAULT_AUX,
    Catalog,
    ReplayDataMissingError,
    Row,
    format_cmc_time,
    iter_snapshots,
    scan_catalog,
    to_cmc_entry,
    to_cmc_info,
)
from ingestor.replay_faults import CMC_MESSAGES, Fault, FaultPlan, FaultSpecError, parse_fault
from ingestor.settings import ReplaySettings, settings_epilog
from tokvel_common.logging import configure_logging

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-CMC_PRO_API_KEY"
API_KEY_PARAM = "CMC_PRO_API_KEY"  # CMC also takes the key in the query string
MAX_LIMIT = 5000
# Credits CMC charges: one per 200 listings returned, one per 100 tokens described.
LISTINGS_PER_CREDIT = 200
INFO_PER_CREDIT = 100

# `sort` values of listings/latest and the recording column each sorts by. `market_cap` is
# CMC's rank order; sorts on data the recording lacks keep that order (every value is null).
SORTS: Mapping[str, str | None] = {
    "market_cap": "cmc_rank",
    "market_cap_strict": "market_cap_usd",
    "name": "name",
    "symbol": "symbol",
    "date_added": "date_added",
    "price": "price_usd",
    "circulating_supply": "circulating_supply",
    "total_supply": "total_supply",
    "max_supply": "max_supply",
    "num_market_pairs": None,
    "market_cap_by_total_supply_strict": None,
    "volume_24h": "volume_24h_usd",
    "volume_7d": None,
    "volume_30d": None,
    "percent_change_1h": "percent_change_1h",
    "percent_change_24h": "percent_change_24h",
    "percent_change_7d": "percent_change_7d",
}
LISTING_PARAMS = frozenset(
    {"start", "limit", "convert", "convert_id", "sort", "sort_dir", "aux", API_KEY_PARAM}
)
INFO_PARAMS = frozenset({"id", "slug", "symbol", "address", "aux", "skip_invalid", API_KEY_PARAM})
USD_CONVERT_ID = "2781"


class CmcRequestError(Exception):
    """A request CMC would refuse; answered with CMC's error envelope."""

    def __init__(self, http_status: int, error_code: int, message: str | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.error_code = error_code
        self.message = message or CMC_MESSAGES.get(error_code, "Bad Request")


def bad_param(message: str) -> CmcRequestError:
    return CmcRequestError(400, 400, message)


def _int_param(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError as exc:
        raise bad_param(f'"{name}" must be a number') from exc
    if value < low:
        raise bad_param(f'"{name}" must be larger than or equal to {low}')
    if value > high:
        raise bad_param(f'"{name}" must be less than or equal to {high}')
    return value


def _check_allowed(query: Mapping[str, str], allowed: frozenset[str]) -> None:
    for name in query:
        if name not in allowed:
            raise bad_param(f'"{name}" is not allowed')


def _one_of(query: Mapping[str, str], name: str, default: str, allowed: Sequence[str]) -> str:
    value = query.get(name, default)
    if value not in allowed:
        raise bad_param(f'"{name}" must be one of [{", ".join(allowed)}]')
    return value


def _aux(query: Mapping[str, str]) -> frozenset[str]:
    if "aux" not in query:
        return frozenset(DEFAULT_AUX)
    fields = frozenset(filter(None, query["aux"].split(",")))
    invalid = sorted(fields - frozenset(ALL_AUX))
    if invalid:
        raise bad_param(f'Invalid value for "aux": "{invalid[0]}"')
    return fields


def _check_convert(query: Mapping[str, str]) -> None:
    """The recording has USD quotes only: another currency is refused rather than invented."""
    if "convert" in query and "convert_id" in query:
        raise bad_param('"convert" and "convert_id" cannot be used together')
    if "convert_id" in query and query["convert_id"] != USD_CONVERT_ID:
        raise bad_param(f'Invalid value for "convert_id": "{query["convert_id"]}"')
    if query.get("convert", "USD").upper() != "USD":
        raise bad_param(f'Invalid value for "convert": "{query["convert"]}"')


def sort_rows(rows: list[Row], sort: str, sort_dir: str) -> list[Row]:
    """Rows in CMC's order for ``sort``: nulls last either way, ties in rank order."""
    column = SORTS[sort]
    if column is None:
        return list(rows)

    def value(row: Row) -> Any:
        raw = row.get(column)
        return raw.lower() if isinstance(raw, str) else raw

    present = [r for r in rows if value(r) is not None]
    missing = [r for r in rows if value(r) is None]
    # `market_cap` sorts by rank, where the largest market cap has the smallest rank.
    descending = (sort_dir == "desc") != (sort == "market_cap")
    present.sort(key=value, reverse=descending)
    return present + missing


def status(
    *, now: datetime, started: float, credit_count: int, total_count: int | None = None
) -> Row:
    body: Row = {
        "timestamp": format_cmc_time(now),
        "error_code": 0,
        "error_message": None,
        "elapsed": round((time.monotonic() - started) * 1000),
        "credit_count": credit_count,
        "notice": None,
    }
    if total_count is not None:
        body["total_count"] = total_count
    return body


def error_response(http_status: int, error_code: int, message: str, now: datetime) -> web.Response:
    body = {
        "status": {
            "timestamp": format_cmc_time(now),
            "error_code": error_code,
            "error_message": message,
            "elapsed": 0,
            "credit_count": 0,
        }
    }
    return json_response(body, http_status)


def json_response(body: Any, http_status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=http_status,
        content_type="application/json",
        charset="utf-8",
    )


class Replay:
    """Where the replay is: the snapshot being served, streamed from the recording.

    The replay lives in the recording's time: every ``status.timestamp`` is the time of the
    snapshot being served, as CMC's was when the snapshot was captured, so event-time consumers
    see a replayed week exactly as they would have lived through it.
    """

    def __init__(self, path: Path, limit: int | None, catalog: Catalog) -> None:
        self.path = path
        self.limit = limit
        self.catalog = catalog
        self.sweeps = 0
        self.requests: Counter[str] = Counter()
        self.exhausted = False
        self._snapshots = iter_snapshots(path, limit)
        self.current = next(self._snapshots)

    @property
    def now(self) -> datetime:
        return self.current.ts

    def reset(self) -> None:
        self._snapshots = iter_snapshots(self.path, self.limit)
        self.current = next(self._snapshots)
        self.sweeps, self.exhausted = 0, False
        self.requests.clear()

    def advance(self) -> None:
        """A sweep was served: the next snapshot, or the last one again at the end."""
        self.sweeps += 1
        following = next(self._snapshots, None)
        if following is None:
            self.exhausted = True
        else:
            self.current = following

    def describe(self) -> Row:
        return {
            "data": str(self.path),
            "snapshot_index": self.current.index,
            "snapshot_ts": format_cmc_time(self.current.ts),
            "snapshot_tokens": len(self.current.rows),
            "snapshots": self.catalog.snapshots,
            "sweeps": self.sweeps,
            "requests": sum(self.requests.values()),
            "requests_by_path": dict(self.requests),
            "exhausted": self.exhausted,
        }


REPLAY_KEY = web.AppKey("replay", Replay)
FAULTS_KEY = web.AppKey("faults", FaultPlan)


class CmcReplayHandlers:
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    async def _guard(self, request: web.Request) -> web.Response | None:
        """Count the request, apply any armed fault, check the API key."""
        replay, faults = request.app[REPLAY_KEY], request.app[FAULTS_KEY]
        replay.requests[request.path] += 1
        fault = faults.next_for(request.path)
        if fault is not None:
            log.info("injecting fault", extra={"fault": fault.kind, "path": request.path})
            spoiled = await self._spoil(request, fault)
            if spoiled is not None:
                return spoiled
        key = request.headers.get(API_KEY_HEADER) or request.query.get(API_KEY_PARAM)
        if not key:
            return error_response(401, 1002, CMC_MESSAGES[1002], replay.now)
        if key != self._api_key:
            return error_response(401, 1001, CMC_MESSAGES[1001], replay.now)
        return None

    async def _spoil(self, request: web.Request, fault: Fault) -> web.Response | None:
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay)
            return None  # then the real answer, if the client is still there
        if fault.kind == "malformed":
            return web.Response(
                body=b'{"status": {"timestamp": "', status=200, content_type="application/json"
            )
        if fault.kind == "bad_envelope":
            return json_response({"status": "ok", "data": None})
        now = request.app[REPLAY_KEY].now
        if fault.kind == "unavailable":
            return web.Response(
                text="<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>",
                status=503,
                content_type="text/html",
            )
        return error_response(
            fault.http, fault.code, CMC_MESSAGES.get(fault.code, "An error occurred."), now
        )

    def listings(self, version: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            started = time.monotonic()
            refused = await self._guard(request)
            if refused is not None:
                return refused
            query = request.query
            replay = request.app[REPLAY_KEY]
            try:
                _check_allowed(query, LISTING_PARAMS)
                start = _int_param(query, "start", 1, 1, sys.maxsize)
                limit = _int_param(query, "limit", 100, 1, MAX_LIMIT)
                _check_convert(query)
                sort = _one_of(query, "sort", "market_cap", tuple(SORTS))
                sort_dir = _one_of(query, "sort_dir", "desc", ("asc", "desc"))
                aux = _aux(query)
            except CmcRequestError as exc:
                return error_response(exc.http_status, exc.error_code, exc.message, replay.now)
            rows = sort_rows(replay.current.rows, sort, sort_dir)
            page = rows[start - 1 : start - 1 + limit]
            body = {
                "status": status(
                    now=replay.now,
                    started=started,
                    credit_count=max(1, math.ceil(len(page) / LISTINGS_PER_CREDIT)),
                    total_count=len(rows),
                ),
                "data": [to_cmc_entry(row, version, aux) for row in page],
            }
            response = json_response(body)
            # Written here rather than by aiohttp after the handler returns: the snapshot moves
            # on only once the answer that completes a sweep has really reached the client.
            try:
                await response.prepare(request)
                await response.write_eof()
            except ConnectionResetError:
                log.info("client left before its answer was written", extra={"path": request.path})
                return response
            if page and start - 1 + len(page) >= len(rows):
                replay.advance()
            return response

        return handler

    async def info(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        refused = await self._guard(request)
        if refused is not None:
            return refused
        query = request.query
        replay = request.app[REPLAY_KEY]
        tokens = replay.catalog.tokens
        try:
            _check_allowed(query, INFO_PARAMS)
            if "id" not in query:
                raise bad_param('"value" must contain at least one of [id, slug, symbol, address]')
            ids = self._ids(query["id"])
            skip_invalid = _one_of(query, "skip_invalid", "false", ("true", "false")) == "true"
            unknown = [i for i in ids if i not in tokens]
            if unknown and not skip_invalid:
                raise bad_param(f'Invalid value for "id": "{unknown[0]}"')
        except CmcRequestError as exc:
            return error_response(exc.http_status, exc.error_code, exc.message, replay.now)
        found = [tokens[i] for i in ids if i in tokens]
        return json_response(
            {
                "status": status(
                    now=replay.now,
                    started=started,
                    credit_count=max(1, math.ceil(len(found) / INFO_PER_CREDIT)),
                ),
                "data": {str(token.cmc_id): to_cmc_info(token) for token in found},
            }
        )

    @staticmethod
    def _ids(text: str) -> list[int]:
        ids: list[int] = []
        for part in text.split(","):
            if not part.strip().isdigit():
                raise bad_param(f'Invalid value for "id": "{part}"')
            ids.append(int(part))
        return list(dict.fromkeys(ids))


async def not_found(request: web.Request) -> web.Response:
    return error_response(404, 404, f"Not found: {request.path}", request.app[REPLAY_KEY].now)


async def admin_state(request: web.Request) -> web.Response:
    replay, faults = request.app[REPLAY_KEY], request.app[FAULTS_KEY]
    return json_response({**replay.describe(), "faults": [f.describe() for f in faults.faults]})


async def admin_add_faults(request: web.Request) -> web.Response:
    """``POST /_replay/faults`` with ``{"faults": ["minute_rate_limit", "slow:delay=3"]}``."""
    try:
        specs = orjson.loads(await request.read()).get("faults")
        if not isinstance(specs, list):
            raise FaultSpecError('the body must be {"faults": ["KIND[:option=value,...]", ...]}')
        parsed = [parse_fault(str(spec)) for spec in specs]
    except (orjson.JSONDecodeError, AttributeError, FaultSpecError) as exc:
        return json_response({"error": str(exc)}, 400)
    for fault in parsed:
        request.app[FAULTS_KEY].add(fault)
    return await admin_state(request)


async def admin_clear_faults(request: web.Request) -> web.Response:
    request.app[FAULTS_KEY].clear()
    return await admin_state(request)


async def admin_reset(request: web.Request) -> web.Response:
    request.app[REPLAY_KEY].reset()
    return await admin_state(request)


def create_app(settings: ReplaySettings) -> web.Application:
    """The replay server; the recording is scanned when the app starts."""
    app = web.Application()
    plan = FaultPlan()
    for spec in settings.replay_faults:
        plan.add(parse_fault(spec))
    app[FAULTS_KEY] = plan

    async def load_recording(app: web.Application) -> AsyncIterator[None]:
        path, limit = settings.tokvel_replay_data, settings.replay_snapshots
        catalog = await asyncio.to_thread(scan_catalog, path, limit)
        if catalog.snapshots == 0:
            raise ReplayDataMissingError(path)
        app[REPLAY_KEY] = Replay(path, limit, catalog)
        log.info("replay data loaded", extra=app[REPLAY_KEY].describe())
        yield

    app.cleanup_ctx.append(load_recording)
    handlers = CmcReplayHandlers(settings.cmc_api_key.get_secret_value())
    app.router.add_get("/v3/cryptocurrency/listings/latest", handlers.listings("v3"))
    app.router.add_get("/v1/cryptocurrency/listings/latest", handlers.listings("v1"))
    app.router.add_get("/v2/cryptocurrency/info", handlers.info)
    app.router.add_get("/_replay/state", admin_state)
    app.router.add_post("/_replay/faults", admin_add_faults)
    app.router.add_delete("/_replay/faults", admin_clear_faults)
    app.router.add_post("/_replay/reset", admin_reset)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokvel run cmc-replay",
        description="A CMC Pro API serving recorded real data (listings v3 and v1, info v2).",
        epilog=settings_epilog(ReplaySettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, help="recording to serve (TOKVEL_REPLAY_DATA)")
    parser.add_argument("--host", help="bind address (REPLAY_HOST)")
    parser.add_argument("--port", type=int, help="port (REPLAY_PORT, default 8090)")
    parser.add_argument("--snapshots", type=int, help="serve only the first N snapshots")
    parser.add_argument(
        "--fault", action="append", default=[], help="inject a fault: KIND[:option=value,...]"
    )
    args = parser.parse_args(argv)
    overrides = {
        "tokvel_replay_data": args.data,
        "replay_host": args.host,
        "replay_port": args.port,
        "replay_snapshots": args.snapshots,
        "replay_faults": args.fault or None,
    }
    settings = ReplaySettings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging("cmc-replay", settings.log_level)
    if not settings.tokvel_replay_data.is_file():
        sys.stderr.write(f"{ReplayDataMissingError(settings.tokvel_replay_data)}\n")
        return 2
    try:
        app = create_app(settings)
    except FaultSpecError as exc:
        sys.stderr.write(f"--fault: {exc}\n")
        return 2
    web.run_app(
        app, host=settings.replay_host, port=settings.replay_port, print=None, access_log=None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
