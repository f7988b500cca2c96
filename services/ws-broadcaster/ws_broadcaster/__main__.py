"""``tokvel run ws``: the WebSocket broadcaster (aiohttp) on WS_HOST:WS_PORT."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from tokvel_common.logging import AccessLogger, configure_logging
from tokvel_common.settings import settings_epilog
from ws_broadcaster.app import create_app
from ws_broadcaster.settings import WsSettings

log = logging.getLogger("ws_broadcaster")

# Beyond the clients' own close timeout: the time web.run_app gives handlers to finish.
SHUTDOWN_GRACE_SECONDS = 5.0


async def _freeze_startup_objects(_: web.Application) -> None:
    """Exempt what start-up created (modules, models, clients: immortal) from the cyclic GC.

    A full collection walks every tracked object; with thousands of connections it pauses the
    fan-out for a few hundred milliseconds, and the start-up objects are a fifth of what it
    walks. Everything allocated later is collected as usual.
    """
    gc.collect()
    gc.freeze()


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tokvel run ws",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog=settings_epilog(WsSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    settings = WsSettings()
    configure_logging("ws-broadcaster", settings.log_level)
    if settings.uses_dev_pepper:
        log.warning(
            "API_KEY_PEPPER is the local development default: set a secret value outside "
            "development (keys created under one pepper are invalid under another)"
        )
    log.info(
        "ws broadcaster starting",
        extra={
            "host": settings.ws_host,
            "port": settings.ws_port,
            "instance": settings.ws_instance_id,
            "event_loop": settings.ws_event_loop,
        },
    )
    loop = uvloop.new_event_loop() if settings.ws_event_loop == "uvloop" else None
    app = create_app(settings)
    app.on_startup.append(_freeze_startup_objects)  # after the app's own contexts started
    web.run_app(
        app,
        loop=loop,
        host=settings.ws_host,
        port=settings.ws_port,
        access_log=logging.getLogger("aiohttp.access") if settings.ws_access_log else None,
        access_log_class=AccessLogger,
        print=None,
        shutdown_timeout=settings.ws_shutdown_timeout_seconds + SHUTDOWN_GRACE_SECONDS,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
