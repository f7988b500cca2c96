"""The worker's ops side server: /healthz, /readyz, /metrics (tokvel_common.ops).

It runs as a service of the Faust worker, started before the app, so that liveness answers
while the table is still being recovered from its changelog.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from typing import Any, cast

from faust.tables import TableManager
from mode import Service

from tokvel_common.ops import ops_server
from velocity.app import VelocityApp

log = logging.getLogger(__name__)


class OpsServer(Service):
    def __init__(self, app: VelocityApp, host: str, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._app = app
        self._host = host
        self._port = port
        self._resources = AsyncExitStack()

    async def _state_recovered(self) -> bool:
        tables = cast(TableManager, self._app.tables)
        return tables.recovery.completed.is_set()

    async def _kafka_assignment(self) -> bool:
        # A worker beyond the partition count holds none: it is healthy but not serving.
        consumer = self._app.consumer
        if not consumer.started or self._app.rebalancing:
            return False
        return bool(consumer.assignment())

    async def on_start(self) -> None:
        checks = {
            "state_recovered": self._state_recovered,
            "kafka_assignment": self._kafka_assignment,
        }
        runner = await self._resources.enter_async_context(
            ops_server(self._host, self._port, checks, self._app.registry)
        )
        log.info("ops endpoints listening", extra={"addresses": [str(a) for a in runner.addresses]})

    async def on_stop(self) -> None:
        await self._resources.aclose()
