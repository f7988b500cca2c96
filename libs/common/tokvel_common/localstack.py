"""Fixed coordinates of the local stack that ``tokvel infra up`` runs on loopback.

Ports are away from the usual defaults so a private stack never collides with a system one.
"""

from __future__ import annotations

KAFKA_PORT = 39092
KAFKA_CONTROLLER_PORT = 39093
POSTGRES_PORT = 35432
POSTGRES_USER = "tokvel"
POSTGRES_PASSWORD = "tokvel"  # noqa: S105 - loopback-only development stack, documented
POSTGRES_DB = "tokvel"
REDIS_PORT = 36379
CMC_REPLAY_PORT = 8090
CMC_REPLAY_API_KEY = "tokvel-local-replay-key"

DATABASE_URL = (
    f"postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@127.0.0.1:{POSTGRES_PORT}/{POSTGRES_DB}"
)
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0"
