"""Steady REST traffic through the gateway, every call kept: status, latency, source.

A few clients in turn ask for a token, its velocity, the ranking and a token's history (the
last always reads PostgreSQL), each at a fixed pace that stays well under the key's per-minute
limit, so that every answer other than 200 is the stack's doing. A call that gets no answer
within ``CLIENT_TIMEOUT_SECONDS`` counts as status 0; its latency is then that timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import orjson

CLIENTS = 4
PAUSE_SECONDS = 0.15  # per client: at most ~25 calls/s in all, the enterprise tier allows 100
CLIENT_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Call:
    started: float  # time.monotonic()
    seconds: float
    path: str
    status: int  # 0: no answer
    source: str | None  # meta.source of a 200: cache, database, live

    @property
    def ok(self) -> bool:
        return self.status == 200


def paths_for(cmc_ids: Sequence[int]) -> list[str]:
    paths: list[str] = []
    for cmc_id in cmc_ids:
        paths += [
            f"/v1/tokens/{cmc_id}",
            f"/v1/tokens/{cmc_id}/velocity",
            f"/v1/tokens/{cmc_id}/history?interval=raw&limit=5",
        ]
    return [*paths, "/v1/tokens?limit=50", "/v1/tokens?sort=velocity&limit=20"]


@dataclass
class ApiLoad:
    base_url: str
    key: str
    paths: list[str]
    calls: list[Call] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_SECONDS),
            headers={"X-API-Key": self.key},
        )
        self._tasks = [
            asyncio.create_task(self._client(self.paths[index::CLIENTS] or self.paths))
            for index in range(CLIENTS)
        ]

    async def stop(self) -> None:
        """Stop calling (a second stop does nothing)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _client(self, paths: list[str]) -> None:
        assert self._session is not None
        for path in itertools.cycle(paths):
            started = time.monotonic()
            status, source = 0, None
            try:
                async with self._session.get(self.base_url + path) as response:
                    status = response.status
                    body = await response.read()
                if status == 200:
                    source = orjson.loads(body).get("meta", {}).get("source")
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError):
                pass
            self.calls.append(Call(started, time.monotonic() - started, path, status, source))
            await asyncio.sleep(PAUSE_SECONDS)

    def between(self, start: float, end: float) -> list[Call]:
        """The calls that were under way at some moment of ``[start, end]``."""
        return [c for c in self.calls if c.started <= end and c.started + c.seconds >= start]


@dataclass(frozen=True)
class CallStats:
    calls: int
    failed: int
    by_status: dict[int, int]
    max_seconds: float
    from_cache: int

    @classmethod
    def of(cls, calls: Sequence[Call]) -> CallStats:
        by_status: dict[int, int] = {}
        for call in calls:
            by_status[call.status] = by_status.get(call.status, 0) + 1
        return cls(
            calls=len(calls),
            failed=sum(not c.ok for c in calls),
            by_status=dict(sorted(by_status.items())),
            max_seconds=max((c.seconds for c in calls), default=0.0),
            from_cache=sum(c.source == "cache" for c in calls),
        )

    def error_share(self) -> str:
        """``failed of calls`` (a percentage is added when some failed, to two decimals)."""
        share = f"{self.failed} of {self.calls} calls"
        return f"{share} ({100 * self.failed / self.calls:.2f} %)" if self.failed else share

    def describe(self) -> str:
        statuses = ", ".join(
            f"{status or 'no answer'}: {n}" for status, n in self.by_status.items()
        )
        return f"{self.calls} calls ({statuses}), slowest {self.max_seconds:.2f} s"
