"""State memory of the velocity processor for 10 000 tokens at a 1-minute cadence.

    .venv/bin/python bench/velocity_state_memory.py [--tokens 10000]

One token is fed 7.5 days of quotes at a 1-minute cadence (the steady state: 12 h of minute
samples, 70 minutes of prices, 7 days of hour buckets), then copied ``--tokens`` times through
its serialized form. Reported: the serialized state per token (what a Faust table and its
changelog hold: ``velocity.tables.TokenState``), and the resident memory (RSS) added by holding
every token's state as bytes (the worker's table in the memory store) and as live
``TokenWindows`` objects. Linux only (RSS from /proc/self/statm).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
from datetime import UTC, datetime, timedelta

from tokvel_common.velocity_math import TokenWindows
from velocity.tables import TokenState

MINUTES = int(7.5 * 24 * 60)
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def steady_state_token() -> TokenState:
    rng = random.Random(14)  # noqa: S311 - synthetic velocities, not cryptography
    windows = TokenWindows(expected_interval_seconds=60)
    start = datetime(2017, 8, 10, tzinfo=UTC)
    for minute in range(MINUTES):
        velocity = round(rng.uniform(0.01, 0.5), 8)
        windows.add(start + timedelta(minutes=minute, seconds=5), velocity, rng.uniform(1, 2))
    return TokenState(windows, partition=3, offset=123_456_789)


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    tokens = parser.parse_args().tokens

    serialized = steady_state_token().to_bytes()
    gc.collect()
    before = rss_bytes()
    stored = [bytes(bytearray(serialized)) for _ in range(tokens)]  # distinct copies
    gc.collect()
    as_bytes = rss_bytes() - before

    before = rss_bytes()
    live = [TokenState.from_bytes(value, 60) for value in stored]
    gc.collect()
    as_objects = rss_bytes() - before

    print(f"{tokens} tokens, 1-minute cadence, steady state (7.5 days fed)")  # noqa: T201
    print(f"serialized state per token: {len(serialized):,} bytes")  # noqa: T201
    print(  # noqa: T201
        f"held as bytes (memory-store table): {mib(as_bytes)} RSS, "
        f"{as_bytes / tokens:,.0f} bytes/token"
    )
    print(  # noqa: T201
        f"held as TokenWindows objects: {mib(as_objects)} RSS, "
        f"{as_objects / tokens:,.0f} bytes/token "
        f"(footprint() says {live[0].windows.memory_footprint():,} bytes)"
    )


if __name__ == "__main__":
    main()
