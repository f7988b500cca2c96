"""JSON bombs and oversized input, to both services: refused fast, nothing buffered.

Three bombs: nesting 100 000 deep, an integer of 5 000 digits, 10 MiB. The gateway takes no
request body at all, so each arrives as a body (413, unread), and also where the gateway does
read input: the query string and path (400) and a header (400). The broadcaster reads JSON
client messages: a bomb over ``WS_MAX_MESSAGE_BYTES`` closes the socket with 1009 as soon as the
frame header announces it; one within the limit is answered with an error and the connection
stays usable. Each answer is timed; the services' peak memory is read around the bombs.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import orjson
import pytest

from tests.abuse.conftest import Figures, Scale
from tests.abuse.stack import AbuseStack
from tests.abuse.support import (
    CHUNK,
    MiB,
    format_ms,
    http_request,
    peak_growth,
    raw_http_status,
    raw_websocket,
)

pytestmark = pytest.mark.abuse

DEPTH: Final = 100_000
DIGITS: Final = 5_000
TEN_MIB: Final = 10 * 1024 * 1024
ANSWER_BOUND_SECONDS: Final = 2.0
MEMORY_BOUND_BYTES: Final = 32 * MiB

DEEP: Final = b"[" * DEPTH + b"]" * DEPTH
HUGE_INTEGER: Final = b'{"limit": ' + b"9" * DIGITS + b"}"
TEN_MIB_BODY: Final = b'{"pad": "' + b"x" * (TEN_MIB - 12) + b'"}'
BOMBS: Final = {"depth 10^5": DEEP, "5 000-digit int": HUGE_INTEGER, "10 MiB": TEN_MIB_BODY}


async def test_gateway_refuses_bombs_fast(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    key = await stack.new_key()
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    digits = "9" * DIGITS
    # name -> (request, the status it must get): read by the application...
    cases = {
        f"body {name}": (http_request("/v1/tokens", headers, body), 413)
        for name, body in BOMBS.items()
    }
    cases |= {
        "query limit=5 000 digits": (http_request(f"/v1/tokens?limit={digits}", headers), 400),
        "query as_of=5 000 digits": (http_request(f"/v1/tokens?as_of={digits}", headers), 400),
        "path cmc_id=5 000 digits": (http_request(f"/v1/tokens/{digits}/velocity", headers), 400),
        "query history limit=5 000 digits": (
            http_request(f"/v1/tokens/1/history?limit={digits}", headers),
            400,
        ),
    }
    # ...and past aiohttp's 8 KiB limits of a request line or header, refused by its parser
    # (400) before any of our code runs. Sent twice: cut after 16 KiB, then read (the 400
    # exactly), and whole while reading (the 400, or a reset if the server closed on data it
    # did not read).
    oversized = {
        "query depth 10^5": http_request(f"/v1/tokens?as_of={'[' * DEPTH}", headers),
        "query 10 MiB": http_request(f"/v1/tokens?as_of={'x' * TEN_MIB}", headers),
        "header 10 MiB": http_request("/v1/tokens", {**headers, "X-Pad": "x" * TEN_MIB}),
    }
    cases |= {f"{name}, first 16 KiB": (r[: 16 * 1024], 400) for name, r in oversized.items()}
    wholes = {f"{name}, whole": (r, 400) for name, r in oversized.items()}
    stack.gateway.reset_peak()
    statuses: dict[str, set[int | None]] = {name: set() for name in cases | wholes}
    slowest = 0.0
    for _ in range(scale.bomb_rounds):
        for name, (request, _) in (cases | wholes).items():
            started = time.perf_counter()
            statuses[name].add(await raw_http_status(stack.gateway.base_url, request))
            slowest = max(slowest, time.perf_counter() - started)
    growth = peak_growth(stack.gateway)
    # Still serving: the bombs cost nothing that lasts.
    ok = http_request("/v1/tokens/1", {"X-API-Key": key})
    assert await raw_http_status(stack.gateway.base_url, ok) == 200

    wrong = {
        name: seen for name, seen in statuses.items() if name in cases and seen != {cases[name][1]}
    }
    wrong |= {
        name: seen for name, seen in statuses.items() if name in wholes and not seen <= {400, None}
    }
    resets = sum(None in seen for seen in statuses.values())
    figures.add(
        "gateway: bombs refused (body 413; query, path, header 400)",
        f"{len(statuses) - len(wrong)}/{len(statuses)} kinds x {scale.bomb_rounds} "
        f"({resets} whole-sent kinds also saw resets), slowest {format_ms(slowest)}",
        f"all, each <= {format_ms(ANSWER_BOUND_SECONDS)}",
        not wrong and slowest <= ANSWER_BOUND_SECONDS,
    )
    figures.add(
        "gateway: peak RSS growth during bombs",
        f"{growth / MiB:.1f} MiB",
        f"<= {MEMORY_BOUND_BYTES // MiB} MiB",
        growth <= MEMORY_BOUND_BYTES,
    )
    assert not wrong, wrong
    assert slowest <= ANSWER_BOUND_SECONDS
    assert growth <= MEMORY_BOUND_BYTES


async def test_broadcaster_refuses_bombs_fast(
    stack: AbuseStack, scale: Scale, figures: Figures
) -> None:
    key = await stack.new_key()
    within_limit = {
        "depth 8 000 (within 16 KiB)": b"[" * 8_000 + b"]" * 8_000,
        "5 000-digit token id": b'{"op": "subscribe", "token_ids": [' + b"9" * DIGITS + b"]}",
    }
    over_limit = {"depth 10^5 (200 KB)": DEEP, "10 MiB": TEN_MIB_BODY}
    stack.ws.reset_peak()
    slowest = 0.0
    failures: list[str] = []
    for _ in range(scale.bomb_rounds):
        for name, frame in within_limit.items():
            async with raw_websocket(stack.ws_url, key) as ws:
                started = time.perf_counter()
                await ws.send_text(frame)
                answer = orjson.loads(await ws.receive_text())
                await ws.send_text(b'{"op": "ping"}')
                pong = orjson.loads(await ws.receive_text())
                slowest = max(slowest, time.perf_counter() - started)
                if answer.get("code") != "invalid_json" or pong.get("op") != "pong":
                    failures.append(f"{name}: {answer} then {pong}")
        for name, frame in over_limit.items():
            # The header and the first 64 KiB, then read: the close frame comes at once.
            async with raw_websocket(stack.ws_url, key) as ws:
                started = time.perf_counter()
                await ws.send_prefix(frame, CHUNK)
                code = await ws.receive_close_code()
                slowest = max(slowest, time.perf_counter() - started)
                if code != 1009:
                    failures.append(f"{name}: close code {code}")
            # The whole frame, written while reading: the server closes as soon as the header
            # announces the size; a client still writing then sees a reset rather than the
            # close frame (TCP drops what it had not read yet), either way at once.
            async with raw_websocket(stack.ws_url, key) as ws:
                started = time.perf_counter()
                sending = asyncio.create_task(ws.send_text(frame, tolerate_reset=True))
                code = await ws.receive_close_code()
                slowest = max(slowest, time.perf_counter() - started)
                sending.cancel()
                if code not in (1009, None):
                    failures.append(f"{name}, written whole: close code {code}")
    growth = peak_growth(stack.ws)
    kinds = len(within_limit) + 2 * len(over_limit)
    figures.add(
        "broadcaster: bombs (over 16 KiB: close 1009; within: invalid_json, still open)",
        f"{kinds - len(failures)}/{kinds} kinds x {scale.bomb_rounds}, slowest "
        f"{format_ms(slowest)}",
        f"all, each <= {format_ms(ANSWER_BOUND_SECONDS)}",
        not failures and slowest <= ANSWER_BOUND_SECONDS,
    )
    figures.add(
        "broadcaster: peak RSS growth during bombs",
        f"{growth / MiB:.1f} MiB",
        f"<= {MEMORY_BOUND_BYTES // MiB} MiB",
        growth <= MEMORY_BOUND_BYTES,
    )
    assert not failures, failures
    assert slowest <= ANSWER_BOUND_SECONDS
    assert growth <= MEMORY_BOUND_BYTES
