"""The replay server over real HTTP: CMC's shapes, paging, credits, errors, sweeps and faults."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ingestor.cmc_client import API_KEY_HEADER
from tests.integration.ingestor.conftest import ReplayServer, recorded_snapshots, replay_server
from tokvel_common import localstack
from tokvel_common.events import CmcListingsResponse
from tokvel_common.paths import SHARED_DATA_DIR

pytestmark = pytest.mark.integration

KEY = {API_KEY_HEADER: localstack.CMC_REPLAY_API_KEY}
REAL_V1 = SHARED_DATA_DIR / "cmc-pro-api" / "listings_v1_2021-04-20T23-30-09Z.json"
LISTINGS = {v: f"/{v}/cryptocurrency/listings/latest" for v in ("v1", "v3")}


async def _get(
    server: ReplayServer, path: str, params: dict[str, str] | None = None, **headers: str
) -> tuple[int, dict[str, Any]]:
    async with server.session.get(
        f"{server.url}{path}", params=params, headers=headers or KEY
    ) as response:
        assert response.content_type == "application/json"
        return response.status, json.loads(await response.read())


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    return type(value).__name__


async def test_status_envelope_has_cmcs_keys_and_types(recording: Path) -> None:
    real = json.loads(REAL_V1.read_text())
    async with replay_server(recording, snapshots=1) as server:
        code, body = await _get(server, LISTINGS["v1"], {"limit": "100"})
    assert code == 200
    assert list(body) == ["status", "data"]
    assert _types(body["status"]) == _types(real["status"])
    # The replay lives in the recording's time: the answer is as of the snapshot's capture.
    assert body["status"]["timestamp"] == "2017-08-10T00:00:05.000Z"
    CmcListingsResponse.model_validate(body)


@pytest.mark.parametrize("version", ["v1", "v3"])
async def test_paging_covers_the_snapshot_and_charges_credits_like_cmc(
    recording: Path, version: str
) -> None:
    snapshot = recorded_snapshots(recording, 1)[0]
    async with replay_server(recording, snapshots=2) as server:
        pages = []
        for start in range(1, len(snapshot) + 1, 70):
            code, body = await _get(server, LISTINGS[version], {"start": str(start), "limit": "70"})
            assert code == 200
            assert body["status"]["total_count"] == len(snapshot)
            assert body["status"]["credit_count"] == max(1, math.ceil(len(body["data"]) / 200))
            pages.append(body["data"])
        state = await server.state()
    ids = [entry["id"] for page in pages for entry in page]
    assert ids == [row["cmc_id"] for row in snapshot]
    assert state["sweeps"] == 1 and state["snapshot_index"] == 1  # the last page moved it on
    quote = pages[0][0]["quote"]
    assert isinstance(quote, list if version == "v3" else dict)


async def test_each_sweep_serves_the_next_snapshot_then_the_last_one_again(
    recording: Path,
) -> None:
    snapshots = recorded_snapshots(recording, 3)
    async with replay_server(recording, snapshots=3) as server:
        seen = []
        for _ in range(5):
            _, body = await _get(server, LISTINGS["v3"], {"limit": "5000"})
            seen.append({e["last_updated"] for e in body["data"]})
        state = await server.state()
    times = [s[0]["ts"].replace("Z", ".000Z") for s in snapshots]
    assert seen == [{times[0]}, {times[1]}, {times[2]}, {times[2]}, {times[2]}]
    assert state["exhausted"] is True


async def test_sort_and_aux(recording: Path) -> None:
    async with replay_server(recording, snapshots=1) as server:
        _, body = await _get(
            server,
            LISTINGS["v1"],
            {"sort": "price", "sort_dir": "asc", "limit": "10", "aux": "cmc_rank"},
        )
    prices = [e["quote"]["USD"]["price"] for e in body["data"]]
    assert prices == sorted(prices)
    assert all(set(e) == {"id", "name", "symbol", "slug", "cmc_rank", "last_updated", "quote"}
               for e in body["data"])  # fmt: skip


@pytest.mark.parametrize(
    ("params", "headers", "http", "code", "message"),
    [
        ({}, {"Accept": "application/json"}, 401, 1002, "API key missing."),
        ({}, {API_KEY_HEADER: "wrong"}, 401, 1001, "This API Key is invalid."),
        ({"limit": "5001"}, KEY, 400, 400, '"limit" must be less than or equal to 5000'),
        ({"start": "0"}, KEY, 400, 400, '"start" must be larger than or equal to 1'),
        ({"limit": "ten"}, KEY, 400, 400, '"limit" must be a number'),
        ({"convert": "EUR"}, KEY, 400, 400, 'Invalid value for "convert": "EUR"'),
        ({"sort_dir": "up"}, KEY, 400, 400, '"sort_dir" must be one of [asc, desc]'),
        ({"aux": "cmc_rank,nope"}, KEY, 400, 400, 'Invalid value for "aux": "nope"'),
        ({"color": "red"}, KEY, 400, 400, '"color" is not allowed'),
    ],
)
async def test_refusals_have_cmcs_error_body(
    recording: Path,
    params: dict[str, str],
    headers: dict[str, str],
    http: int,
    code: int,
    message: str,
) -> None:
    async with replay_server(recording, snapshots=1) as server:
        status, body = await _get(server, LISTINGS["v3"], params, **headers)
        state = await server.state()
    assert status == http
    assert body == {
        "status": {
            "timestamp": body["status"]["timestamp"],
            "error_code": code,
            "error_message": message,
            "elapsed": 0,
            "credit_count": 0,
        }
    }
    assert state["sweeps"] == 0


async def test_the_key_may_also_come_in_the_query(recording: Path) -> None:
    async with replay_server(recording, snapshots=1) as server:
        status, _ = await _get(
            server, LISTINGS["v1"], {"CMC_PRO_API_KEY": localstack.CMC_REPLAY_API_KEY},
            Accept="application/json",
        )  # fmt: skip
    assert status == 200


async def test_info_describes_tokens_and_skips_or_refuses_unknown_ids(recording: Path) -> None:
    async with replay_server(recording, snapshots=1) as server:
        status, body = await _get(server, "/v2/cryptocurrency/info", {"id": "1,1027"})
        assert status == 200
        assert set(body["data"]) == {"1", "1027"}
        assert body["data"]["1"]["symbol"] == "BTC" and body["data"]["1"]["description"] is None
        assert body["status"]["credit_count"] == 1 and "total_count" not in body["status"]
        status, body = await _get(server, "/v2/cryptocurrency/info", {"id": "1,42424242"})
        assert (
            status == 400
            and body["status"]["error_message"] == 'Invalid value for "id": "42424242"'
        )
        status, body = await _get(
            server, "/v2/cryptocurrency/info", {"id": "1,42424242", "skip_invalid": "true"}
        )
        assert status == 200 and set(body["data"]) == {"1"}


async def test_faults_armed_at_runtime_spoil_the_next_requests(recording: Path) -> None:
    async with replay_server(recording, snapshots=2) as server:
        await server.arm("minute_rate_limit", "server_error", "error:http=200,code=1009")
        first, body = await _get(server, LISTINGS["v3"])
        assert (first, body["status"]["error_code"]) == (429, 1008)
        assert body["status"]["error_message"].startswith("You've exceeded")
        second, body = await _get(server, LISTINGS["v3"])
        assert (second, body["status"]["error_code"]) == (500, 500)
        third, body = await _get(server, LISTINGS["v3"])
        assert (third, body["status"]["error_code"]) == (200, 1009)
        await server.arm("malformed")
        async with server.session.get(f"{server.url}{LISTINGS['v3']}", headers=KEY) as response:
            assert response.status == 200
            with pytest.raises(json.JSONDecodeError):
                json.loads(await response.read())
        fine, _ = await _get(server, LISTINGS["v3"], {"limit": "5000"})
        state = await server.state()
    assert fine == 200 and state["sweeps"] == 1 and state["faults"] == []


async def test_a_slow_answer_the_client_gave_up_on_does_not_move_the_replay(
    recording: Path,
) -> None:
    async with replay_server(recording, snapshots=2, faults=("slow:delay=1",)) as server:
        with pytest.raises(TimeoutError):
            async with server.session.get(
                f"{server.url}{LISTINGS['v3']}",
                params={"limit": "5000"},
                headers=KEY,
                timeout=aiohttp.ClientTimeout(total=0.3),
            ) as response:
                await response.read()
        await asyncio.sleep(1.3)  # the server finishes its late answer to nobody
        state = await server.state()
        assert (state["requests"], state["sweeps"], state["snapshot_index"]) == (1, 0, 0)
