"""/openapi.json (OpenAPI 3.1 from the models), the docs page (no CDN) and the ops endpoints."""

from __future__ import annotations

import re

import pytest

from tests.integration.gateway.conftest import Api

pytestmark = pytest.mark.integration


async def test_openapi_is_3_1_and_describes_every_route(api: Api) -> None:
    response = await api.session.get(api.base_url + "/openapi.json")
    assert response.status == 200
    spec = await response.json()
    assert spec["openapi"] == "3.1.0"
    for path in (
        "/v1/tokens",
        "/v1/tokens/{cmc_id}",
        "/v1/tokens/{cmc_id}/velocity",
        "/v1/tokens/{cmc_id}/history",
        "/v1/symbols/{symbol}",
        "/v1/usage",
    ):
        operation = spec["paths"][path]["get"]
        assert operation["security"] == [{"ApiKey": []}]
        assert {"200", "400", "401", "403", "429", "503"} <= set(operation["responses"])
        assert "Retry-After" in operation["responses"]["429"]["headers"]
    schemas = spec["components"]["schemas"]
    assert {"ErrorResponse", "TokenListResponse", "HistoryPoint", "VelocityData"} <= set(schemas)
    history = spec["paths"]["/v1/tokens/{cmc_id}/history"]["get"]
    names = {p["name"] for p in history["parameters"]}
    assert names == {"cmc_id", "from", "to", "interval", "fill", "format", "limit", "cursor"}
    assert "text/csv" in history["responses"]["200"]["content"]


async def test_docs_page_loads_nothing_from_elsewhere(api: Api) -> None:
    page = await api.session.get(api.base_url + "/docs")
    assert page.status == 200
    html = await page.text()
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    for asset in re.findall(r"(?:src|href)=\"(/[^\"]+)\"", html):
        response = await api.session.get(api.base_url + asset)
        assert response.status == 200, asset
        assert len(await response.read()) > 0
    missing = await api.session.get(api.base_url + "/docs/static/../../etc/passwd")
    assert missing.status == 404


async def test_ops_endpoints(api: Api) -> None:
    assert (await api.session.get(api.base_url + "/healthz")).status == 200
    ready = await api.session.get(api.base_url + "/readyz")
    assert ready.status == 200 and (await ready.json())["checks"] == {"storage": True}
    metrics = await api.session.get(api.base_url + "/metrics")
    assert "gateway_http_requests_total" in await metrics.text()
