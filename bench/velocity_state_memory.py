"""State memory of the velocity processor for 10 000 tokens at a 1-minute cadence.

    .venv/bin/python bench/velocity_state_memory.py [--tokens 10000] [--json PATH]

One token is fed 7.5 days of quotes at a 1-minute cadence (the steady state: 12 h of minute
samples, 70 minutes of prices, 7 days of hour buckets), then copied ``--tokens`` times through
its serialized form. Reported: the serialized state per token (what a Faust table and its
changelog hold: ``velocity.tables.TokenState``), and the resident memory (RSS) added by holding
every token's state as bytes (the worker's table in the memory store) and as live
``TokenWindows`` objects. Linux only (RSS from /proc/self/statm).

The figure (``--json``) is the RSS added by the states as the worker holds them: bytes in its
table (a batch deserializes only the tokens it touches, at most VELOCITY_BATCH_SIZE of them,
and lets them go once delivered). Target: under 128 MiB for 10 000 tokens. The live objects'
RSS is reported beside it.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import Figure, write_figures
from tokvel_common.velocity_math import TokenWindows
from velocity.tables import TokenState

MINUTES = int(7.5 * 24 * 60)
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
TARGET_MIB = 128


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
    parser.add_argument("--json", type=Path, help="write the figure there (bench/report.py)")
    args = parser.parse_args()
    tokens = args.tokens

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
    if args.json:
        held_mib = as_bytes / 2**20
        figure = Figure(
            figure=f"velocity state memory, {tokens:,} tokens (12 h minute + 7 d hour buckets)",
            unit="MiB",
            tokvel=held_mib,
            target=f"< {TARGET_MIB} MiB",
            met=held_mib < TARGET_MIB,
            detail={
                "serialized_bytes_per_token": len(serialized),
                "rss_bytes_held_as_bytes": as_bytes,
                "rss_bytes_as_live_objects": as_objects,
                "footprint_bytes_per_token": live[0].windows.memory_footprint(),
            },
        )
        write_figures(args.json, [figure])


if __name__ == "__main__":
    main()
