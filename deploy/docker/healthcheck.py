"""Container health check of the tokvel image: GET a service's /healthz, exit 0 on a 2xx.

The image runs any of the services, each on its own port, and python:3.11-slim has no curl, so
the Dockerfile's HEALTHCHECK runs this (stdlib only, no import of tokvel: it must stay cheap
and work even when a service package is broken). Which URL:

1. the first argument (docker-compose.yml names each service's URL explicitly), else
2. ``TOKVEL_HEALTHCHECK_URL``, else
3. every default ops port on loopback in turn: a container runs one service, so exactly one
   of them answers. Healthy as soon as one answers 2xx.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Final

# gateway, ws, ingestor, writer, velocity (their settings' defaults); cmc-replay has no /healthz
# yet and is checked by docker-compose.yml through /_replay/state.
DEFAULT_PORTS: Final = (8080, 8081, 8091, 8092, 8093)
TIMEOUT_SECONDS: Final = 3.0


def healthy(url: str) -> bool:
    if not url.startswith(("http://", "https://")):
        raise SystemExit(f"healthcheck: not an http(s) URL: {url!r}")
    try:
        # The scheme is checked above: no file:// or custom scheme can get here.
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310
            status: int = response.status
            return 200 <= status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: Sequence[str]) -> int:
    explicit = argv[0] if argv else os.environ.get("TOKVEL_HEALTHCHECK_URL")
    urls = (
        [explicit] if explicit else [f"http://127.0.0.1:{port}/healthz" for port in DEFAULT_PORTS]
    )
    return 0 if any(healthy(url) for url in urls) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
