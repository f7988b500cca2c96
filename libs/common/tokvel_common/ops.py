"""The ops endpoints every service exposes: ``/healthz``, ``/readyz``, ``/metrics``.

``/healthz`` is liveness only (the event loop answers). ``/readyz`` runs the service's readiness
checks (pool, Redis, Kafka assignment...) and answers 503 naming the ones that failed. A service
that already runs an aiohttp app adds :func:`add_ops_routes` to it; one that doesn't (a Kafka
worker) runs :func:`ops_server` as a small side server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

ReadinessCheck = Callable[[], Awaitable[bool]]

log = logging.getLogger(__name__)

READINESS_TIMEOUT_SECONDS = 2.0


async def _run_check(name: str, check: ReadinessCheck) -> tuple[str, bool]:
    try:
        ok = await asyncio.wait_for(check(), READINESS_TIMEOUT_SECONDS)
    except Exception:
        log.warning("readiness check failed", extra={"check": name}, exc_info=True)
        ok = False
    return name, ok


def add_ops_routes(
    app: web.Application,
    checks: Mapping[str, ReadinessCheck],
    registry: CollectorRegistry = REGISTRY,
) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        results = dict(await asyncio.gather(*(_run_check(n, c) for n, c in checks.items())))
        ready = all(results.values())
        body = {"status": "ready" if ready else "not_ready", "checks": results}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


@asynccontextmanager
async def ops_server(
    host: str,
    port: int,
    checks: Mapping[str, ReadinessCheck],
    registry: CollectorRegistry = REGISTRY,
) -> AsyncIterator[web.AppRunner]:
    """Serve the ops endpoints on ``host:port`` for the lifetime of the context."""
    app = web.Application()
    add_ops_routes(app, checks, registry)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        yield runner
    finally:
        await runner.cleanup()
