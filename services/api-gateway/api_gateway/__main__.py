"""``tokvel run gateway``: the REST API (aiohttp) on HOST:PORT."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from api_gateway.app import create_app
from api_gateway.settings import GatewaySettings
from tokvel_common.logging import configure_logging

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
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        access_log=logging.getLogger("aiohttp.access") if settings.access_log else None,
        print=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
