"""Fixed coordinates of the local stack that ``tokvel infra up`` runs on loopback.

Ports are away from the usual defaults so a private stack never collides with a system one, and
below Linux's ephemeral range (32768-60999), where an outgoing connection may hold a port (even
with the largest offset the suites use, 2050).
``TOKVEL_PORT_OFFSET`` shifts every one of them, so a second stack (a drill, a benchmark) can run
beside the first with its own ``TOKVEL_RUN_DIR``.
"""

from __future__ import annotations

import os

PORT_OFFSET_ENV = "TOKVEL_PORT_OFFSET"
PORT_OFFSET = int(os.environ.get(PORT_OFFSET_ENV) or 0)

KAFKA_PORT = 29092 + PORT_OFFSET
KAFKA_CONTROLLER_PORT = 29093 + PORT_OFFSET
POSTGRES_PORT = 25432 + PORT_OFFSET
POSTGRES_USER = "tokvel"
POSTGRES_PASSWORD = "tokvel"  # noqa: S105 - loopback-only development stack, documented
POSTGRES_DB = "tokvel"
REDIS_PORT = 26379 + PORT_OFFSET
CMC_REPLAY_PORT = 8090 + PORT_OFFSET
CMC_REPLAY_API_KEY = "tokvel-local-replay-key"

DATABASE_URL = (
    f"postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@127.0.0.1:{POSTGRES_PORT}/{POSTGRES_DB}"
)
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
