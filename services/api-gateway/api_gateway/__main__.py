"""``tokvel run gateway``: the REST API (aiohttp) on HOST:PORT."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from api_gateway.app import create_app
from api_gateway.settings import GatewaySettings
from tokvel_common.logging import AccessLogger, configure_logging

log = logging.getLogger("api_gateway")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tokvel run gateway",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Every setting is an environment variable (see services/api-gateway/README.md).",
    )
    parser.parse_args(argv)
    settings = GatewaySettings()
    configure_logging("api-gateway", settings.log_level)
    if settings.uses_dev_pepper:
        log.warning(
            "API_KEY_PEPPER is the local development default: set a secret value outside "
            "development (keys created under one pepper are invalid under another)"
        )
    log.info("gateway starting", extra={"host": settings.host, "port": settings.port})
    app = create_app(settings)
    # Everything built so far (modules, pydantic schemas, the OpenAPI document) lives as long as
    # the process: out of the collector's way, a full collection walks only what requests
    # allocate, instead of pausing every request for tens of milliseconds.
    gc.freeze()
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        access_log_class=AccessLogger,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
