"""What each CMC answer means, and the retry loop, without a network."""

from __future__ import annotations

import random
from pathlib import Path

import orjson
import pytest

from ingestor.cmc_client import (
    Action,
    CmcError,
    RetryPolicy,
    call_with_retries,
    classify,
    parse_answer,
)
from tokvel_common.paths import SHARED_DATA_DIR

REAL_ANSWERS = sorted((SHARED_DATA_DIR / "cmc-pro-api").glob("listings_v1_*.json"))


def _error_body(code: int, message: str = "x") -> bytes:
    return orjson.dumps(
        {
            "status": {
                "timestamp": "2018-06-02T22:51:28.209Z",
                "error_code": code,
                "error_message": message,
                "elapsed": 10,
                "credit_count": 0,
            }
        }
    )


@pytest.mark.parametrize(
    ("http_status", "code", "reason", "action"),
    [
        (401, 1001, "api_key_invalid", Action.STOP),
        (401, 1002, "api_key_missing", Action.STOP),
        (402, 1003, "plan_requires_payment", Action.STOP),
        (402, 1004, "plan_payment_expired", Action.STOP),
        (403, 1005, "api_key_required", Action.STOP),
        (403, 1006, "plan_not_authorized", Action.STOP),
        (403, 1007, "api_key_disabled", Action.STOP),
        (429, 1008, "minute_rate_limit", Action.WAIT_WINDOW),
        (429, 1009, "daily_credits_exhausted", Action.WAIT_DAY),
        (429, 1010, "monthly_credits_exhausted", Action.WAIT_MONTH),
        (429, 1011, "ip_rate_limit", Action.WAIT_WINDOW),
        (400, 400, "bad_request", Action.STOP),
        (500, 500, "server_error", Action.RETRY),
        (503, 503, "server_error", Action.RETRY),
        (200, 1008, "minute_rate_limit", Action.WAIT_WINDOW),  # a 200 carrying an error
        (200, 1001, "api_key_invalid", Action.STOP),
        (200, 5555, "cmc_error_5555", Action.RETRY),
        (404, 404, "http_404", Action.STOP),  # a wrong base URL
    ],
)
def test_every_error_answer_means_what_cmc_documents(
    http_status: int, code: int, reason: str, action: Action
) -> None:
    assert classify(http_status, code) == (reason, action)
    with pytest.raises(CmcError) as caught:
        parse_answer(http_status, _error_body(code, "documented message"))
    assert (caught.value.reason, caught.value.action) == (reason, action)
    assert caught.value.error_code == code
    assert caught.value.detail == "documented message"


@pytest.mark.parametrize("path", REAL_ANSWERS, ids=lambda p: Path(p).name)
def test_real_answers_pass_the_envelope_check(path: Path) -> None:
    answer = parse_answer(200, path.read_bytes())
    assert answer.status.error_code == 0
    assert answer.status.credit_count == 1
    assert isinstance(answer.data, list) and len(answer.data) == 100


@pytest.mark.parametrize(
    ("http_status", "body", "reason", "action"),
    [
        (200, b'{"status": {"timestamp": "', "malformed_response", Action.RETRY),
        (200, b"[1, 2, 3]", "malformed_response", Action.RETRY),
        (200, b'{"status": "ok", "data": []}', "malformed_response", Action.RETRY),
        (200, b'{"status": {"error_code": 0}, "data": []}', "malformed_response", Action.RETRY),
        (200, b"", "malformed_response", Action.RETRY),
        (503, b"<html>Service Unavailable</html>", "server_error", Action.RETRY),
        (502, b"", "server_error", Action.RETRY),
        (429, b"Too Many Requests", "rate_limited", Action.WAIT_WINDOW),
        (401, b"", "unauthorized", Action.STOP),
        (403, b"<html>Forbidden</html>", "forbidden", Action.STOP),
    ],
)
def test_answers_that_are_no_cmc_envelope_are_errors_never_crashes(
    http_status: int, body: bytes, reason: str, action: Action
) -> None:
    with pytest.raises(CmcError) as caught:
        parse_answer(http_status, body)
    assert (caught.value.reason, caught.value.action) == (reason, action)


POLICY = RetryPolicy(max_attempts=4, backoff_base=1.0, backoff_max=8.0, window=60.0)


class Script:
    """A call that fails with the given errors, then answers 'ok'."""

    def __init__(self, *errors: CmcError) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.sleeps: list[float] = []
        self.seen: list[str] = []

    async def call(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def run(self) -> str:
        return await call_with_retries(
            self.call,
            POLICY,
            sleep=self.sleep,
            wall_clock=lambda: 600.0 + 15.0,  # 15 s into a minute
            rng=random.Random(0),
            on_error=lambda exc: self.seen.append(exc.reason),
        )


def _err(reason: str, action: Action) -> CmcError:
    return CmcError(reason, action, "test")


async def test_transient_errors_are_retried_with_growing_jittered_waits() -> None:
    script = Script(*(_err("server_error", Action.RETRY) for _ in range(3)))
    assert await script.run() == "ok"
    assert script.calls == 4
    assert script.seen == ["server_error"] * 3
    for attempt, wait in enumerate(script.sleeps):
        assert 0 <= wait <= min(8.0, 2.0**attempt)


async def test_minute_limit_waits_for_the_next_minute_then_goes_on() -> None:
    script = Script(_err("minute_rate_limit", Action.WAIT_WINDOW))
    assert await script.run() == "ok"
    assert len(script.sleeps) == 1
    assert 45.0 <= script.sleeps[0] <= 46.0


async def test_attempts_are_bounded() -> None:
    script = Script(*(_err("timeout", Action.RETRY) for _ in range(10)))
    with pytest.raises(CmcError, match="timeout"):
        await script.run()
    assert script.calls == POLICY.max_attempts
    assert len(script.sleeps) == POLICY.max_attempts - 1


@pytest.mark.parametrize("action", [Action.STOP, Action.WAIT_DAY, Action.WAIT_MONTH])
async def test_errors_a_retry_cannot_fix_are_raised_at_once(action: Action) -> None:
    script = Script(_err("no", action))
    with pytest.raises(CmcError):
        await script.run()
    assert script.calls == 1
    assert script.sleeps == []
