"""``tokvel run SERVICE``: one service in the foreground, found by entry point."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "tokvel.services"

ServiceMain = Callable[[Sequence[str]], int]


def available_services() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run", help="run one service in the foreground"
    )
    parser.add_argument("service", help="ingestor, velocity, writer, gateway, ws, cmc-replay")
    parser.add_argument("service_args", nargs=argparse.REMAINDER, help="passed to the service")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    services = available_services()
    if args.service not in services:
        known = ", ".join(sorted(services)) or "none installed"
        raise SystemExit(f"tokvel run: unknown service {args.service!r} (known: {known})")
    service_main: ServiceMain = services[args.service].load()
    return service_main(list(args.service_args))
