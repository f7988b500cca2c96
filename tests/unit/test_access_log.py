"""The services' access log never writes a secret query parameter (the WebSocket's api_key)."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from tokvel_common.logging import REDACTED, AccessLogger, loggable_target

KEY = "tvk_" + "a" * 39


def test_secret_query_parameters_are_redacted_and_the_rest_kept() -> None:
    request = make_mocked_request("GET", f"/v1/ws?x=1&api_key={KEY}&API_KEY={KEY}&y=%20z")
    target = loggable_target(request)
    assert KEY not in target
    assert target == f"/v1/ws?x=1&api_key={REDACTED}&API_KEY={REDACTED}&y=+z"
    plain = make_mocked_request("GET", "/v1/tokens?limit=5")
    assert loggable_target(plain) == "/v1/tokens?limit=5"


def test_one_line_per_request_without_the_key(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.access")
    request = make_mocked_request(
        "GET", f"/v1/ws?api_key={KEY}", headers={"User-Agent": "probe", "X-API-Key": KEY}
    )
    with caplog.at_level(logging.INFO, logger="test.access"):
        AccessLogger(logger, "").log(request, web.Response(status=101), 0.25)
    (record,) = caplog.records
    assert record.getMessage() == f"GET /v1/ws?api_key={REDACTED} 101"
    assert KEY not in str(vars(record))
    fields = vars(record)
    assert (fields["status"], fields["seconds"], fields["user_agent"]) == (101, 0.25, "probe")
