"""The CMC Pro API client: one request per call, every answer's envelope checked, nothing trusted.

What an error means is decided here (:func:`classify`); what to do about it (retry, wait, stop)
is the caller's: :func:`call_with_retries` for the transient ones, the poller for the rest.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from pydantic import ValidationError

from ingestor.metrics import IngestorMetrics
from ingestor.settings import ApiVersion
from ingestor.timing import backoff_delay, until_next_window
from tokvel_common.events import CmcStatus
from tokvel_common.serialization import loads

log = logging.getLogger(__name__)

API_KEY_HEADER = "X-CMC_PRO_API_KEY"
LISTINGS_PATHS: Mapping[ApiVersion, str] = {
    "v3": "/v3/cryptocurrency/listings/latest",
    "v1": "/v1/cryptocurrency/listings/latest",
}
INFO_PATH = "/v2/cryptocurrency/info"
CONVERT = "USD"

T = TypeVar("T")


class Action(enum.Enum):
    STOP = "stop"  # the key or the plan is wrong: polling again cannot help
    RETRY = "retry"  # transient: retry with exponential backoff and jitter
    WAIT_WINDOW = "wait_window"  # per-minute limit: the next request waits for the next minute
    WAIT_DAY = "wait_day"  # daily credits spent: nothing until UTC midnight
    WAIT_MONTH = "wait_month"  # monthly credits spent: nothing until the month resets


# CMC's own error codes (status.error_code), each with its metric reason and what it means.
CMC_ERROR_CODES: Mapping[int, tuple[str, Action]] = {
    1001: ("api_key_invalid", Action.STOP),
    1002: ("api_key_missing", Action.STOP),
    1003: ("plan_requires_payment", Action.STOP),
    1004: ("plan_payment_expired", Action.STOP),
    1005: ("api_key_required", Action.STOP),
    1006: ("plan_not_authorized", Action.STOP),
    1007: ("api_key_disabled", Action.STOP),
    1008: ("minute_rate_limit", Action.WAIT_WINDOW),
    1009: ("daily_credits_exhausted", Action.WAIT_DAY),
    1010: ("monthly_credits_exhausted", Action.WAIT_MONTH),
    1011: ("ip_rate_limit", Action.WAIT_WINDOW),
}
# When the body carries no known code, the HTTP status decides.
HTTP_STATUSES: Mapping[int, tuple[str, Action]] = {
    400: ("bad_request", Action.STOP),
    401: ("unauthorized", Action.STOP),
    402: ("payment_required", Action.STOP),
    403: ("forbidden", Action.STOP),
    408: ("request_timeout", Action.RETRY),
    429: ("rate_limited", Action.WAIT_WINDOW),
}


def _by_http_status(status: int) -> tuple[str, Action] | None:
    if status in HTTP_STATUSES:
        return HTTP_STATUSES[status]
    if 500 <= status < 600:
        return "server_error", Action.RETRY
    if 400 <= status < 500:
        # 404 and the like: a wrong CMC_BASE_URL or path, which no retry will fix.
        return f"http_{status}", Action.STOP
    return None


def classify(http_status: int, error_code: int | None) -> tuple[str, Action]:
    """What an error answer means: a metric reason and the action it calls for.

    CMC's own code decides; CMC puts the HTTP status in ``error_code`` when it has no code of
    its own, so that is read as one, even inside a 200.
    """
    if error_code is not None and error_code in CMC_ERROR_CODES:
        return CMC_ERROR_CODES[error_code]
    for status in (http_status, error_code):
        meaning = None if status is None else _by_http_status(status)
        if meaning is not None:
            return meaning
    # A 200 with a non-zero error_code CMC has not documented: CMC's side, so retry.
    return f"cmc_error_{error_code}", Action.RETRY


class CmcError(Exception):
    def __init__(
        self,
        reason: str,
        action: Action,
        detail: str,
        *,
        http_status: int | None = None,
        error_code: int | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.action = action
        self.detail = detail
        self.http_status = http_status
        self.error_code = error_code


@dataclass(frozen=True)
class CmcAnswer:
    status: CmcStatus
    data: Any  # untrusted JSON: callers validate it item by item


def parse_answer(http_status: int, body: bytes) -> CmcAnswer:
    """Check one answer: JSON, a valid ``status`` envelope, ``error_code`` 0 and a 2xx status.

    Raises :class:`CmcError` for anything else; a body that is not a CMC envelope at all is a
    ``malformed_response`` (retried: proxies and overloaded servers produce those).
    """
    try:
        document = loads(body)
    except ValueError as exc:
        if http_status >= 400:
            reason, action = classify(http_status, None)
            raise CmcError(reason, action, f"HTTP {http_status}", http_status=http_status) from exc
        raise CmcError(
            "malformed_response", Action.RETRY, f"not JSON: {exc}", http_status=http_status
        ) from exc
    raw_status = document.get("status") if isinstance(document, dict) else None
    try:
        status = CmcStatus.model_validate(raw_status)
    except ValidationError as exc:
        if http_status >= 400:
            reason, action = classify(http_status, None)
            raise CmcError(reason, action, f"HTTP {http_status}", http_status=http_status) from exc
        raise CmcError(
            "malformed_response",
            Action.RETRY,
            f"no valid status envelope: {exc.error_count()} errors",
            http_status=http_status,
        ) from exc
    if status.error_code != 0 or http_status >= 300:
        reason, action = classify(http_status, status.error_code)
        raise CmcError(
            reason,
            action,
            status.error_message or f"HTTP {http_status}",
            http_status=http_status,
            error_code=status.error_code,
        )
    return CmcAnswer(status, document.get("data"))


@dataclass(frozen=True)
class ListingsPage:
    status: CmcStatus
    total_count: int
    entries: list[Any]


class CmcClient:
    """One HTTP request per call against ``base_url``; the key travels in its header only."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        api_key: str,
        metrics: IngestorMetrics,
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._headers = {API_KEY_HEADER: api_key, "Accept": "application/json"}
        self._metrics = metrics

    async def get(self, path: str, params: Mapping[str, str]) -> CmcAnswer:
        endpoint = path.strip("/").replace("/", "_")
        try:
            async with self._session.get(
                f"{self._base_url}{path}", params=params, headers=self._headers
            ) as response:
                body = await response.read()
                http_status = response.status
        except TimeoutError as exc:
            self._metrics.cmc_requests.labels(endpoint, "timeout").inc()
            raise CmcError("timeout", Action.RETRY, "no answer in time") from exc
        except aiohttp.ClientError as exc:
            self._metrics.cmc_requests.labels(endpoint, "connection_error").inc()
            raise CmcError("connection_error", Action.RETRY, repr(exc)) from exc
        try:
            answer = parse_answer(http_status, body)
        except CmcError as exc:
            self._metrics.cmc_requests.labels(endpoint, exc.reason).inc()
            raise
        self._metrics.cmc_requests.labels(endpoint, "ok").inc()
        self._metrics.credits.labels(endpoint).inc(max(0, answer.status.credit_count))
        return answer

    async def listings_page(self, version: ApiVersion, start: int, limit: int) -> ListingsPage:
        answer = await self.get(
            LISTINGS_PATHS[version], {"start": str(start), "limit": str(limit), "convert": CONVERT}
        )
        if not isinstance(answer.data, list):
            raise CmcError("malformed_response", Action.RETRY, "listings `data` is not a list")
        if answer.status.total_count is None:
            raise CmcError("malformed_response", Action.RETRY, "listings without total_count")
        return ListingsPage(answer.status, answer.status.total_count, answer.data)

    async def info(self, ids: Iterable[int]) -> dict[str, Any]:
        answer = await self.get(
            INFO_PATH, {"id": ",".join(str(i) for i in ids), "skip_invalid": "true"}
        )
        if not isinstance(answer.data, dict):
            raise CmcError("malformed_response", Action.RETRY, "info `data` is not an object")
        return answer.data


Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff_base: float
    backoff_max: float
    window: float  # CMC's rate-limit window (a minute)

    def delay(self, action: Action, attempt: int, now: float, rng: random.Random) -> float:
        if action is Action.WAIT_WINDOW:
            return until_next_window(now, self.window, rng)
        return backoff_delay(attempt, self.backoff_base, self.backoff_max, rng)


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    sleep: Sleep,
    wall_clock: Callable[[], float],
    rng: random.Random,
    on_error: Callable[[CmcError], None],
) -> T:
    """``call()`` until it succeeds, retrying transient errors and per-minute limits.

    Errors that retrying cannot fix (STOP, WAIT_DAY, WAIT_MONTH) and the last failure once the
    attempts are spent are raised for the caller. ``sleep`` is the caller's, so a shutdown can
    interrupt a wait.
    """
    attempt = 0
    while True:
        try:
            return await call()
        except CmcError as exc:
            on_error(exc)
            retryable = exc.action in (Action.RETRY, Action.WAIT_WINDOW)
            if not retryable or attempt + 1 >= policy.max_attempts:
                raise
            delay = policy.delay(exc.action, attempt, wall_clock(), rng)
            log.warning(
                "CMC request failed, retrying",
                extra={"reason": exc.reason, "detail": exc.detail, "retry_in_s": round(delay, 2)},
            )
            await sleep(delay)
            attempt += 1
