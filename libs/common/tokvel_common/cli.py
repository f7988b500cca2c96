"""``tokvel``: the one console command for users, operators and tests.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module sets the
``handler`` default that receives the parsed arguments and returns the exit code. Services are
found through the ``tokvel.services`` entry-point group, and the subcommands a service owns
(``backfill``, ``keys``) through ``tokvel.commands``, so this library never imports a service.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from tokvel_common.commands import infra_cmd, migrate_cmd, run_cmd, stack_cmd

COMMANDS_ENTRY_POINT_GROUP = "tokvel.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokvel", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (run_cmd, migrate_cmd, infra_cmd, stack_cmd):
        module.register(subparsers)
    for entry_point in sorted(entry_points(group=COMMANDS_ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = entry_point.load()
        except ImportError as exc:
            # One broken service package must not take `tokvel infra` or `migrate` down with it.
            sys.stderr.write(f"tokvel: command {entry_point.name!r} unavailable: {exc}\n")
            continue
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
