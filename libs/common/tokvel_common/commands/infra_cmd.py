"""``tokvel infra up|down|status|reset|env``: the private local stack (Kafka, PostgreSQL, Redis).

See :mod:`tokvel_common.infra` for how each service is run and where its data lives. The stack
module is imported by the handlers, not here: every ``tokvel`` command builds this parser, and
none of them should pay for (or be broken by) the Kafka, PostgreSQL and Redis clients.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

ACTIONS: dict[str, str] = {
    "up": "start Kafka (KRaft), PostgreSQL 15 and Redis 7 on loopback (idempotent)",
    "down": "stop exactly the processes `infra up` started",
    "status": "state of each service, where its data is, and the connection settings",
    "reset": "stop the stack and delete its data (the Kafka jar cache stays)",
    "env": "KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL, REDIS_URL as lines a shell can source",
}


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "infra",
        help="the private local stack: Kafka, PostgreSQL, Redis",
        description="Run dir: <project>/.run, or $TOKVEL_RUN_DIR.",
    )
    actions = parser.add_subparsers(dest="infra_command", required=True, metavar="ACTION")
    for name, help_text in ACTIONS.items():
        actions.add_parser(name, help=help_text, description=help_text).set_defaults(
            handler=_handler(name)
        )


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    def handle(_args: argparse.Namespace) -> int:
        return _dispatch(name)

    return handle


def _dispatch(name: str) -> int:
    from tokvel_common.infra import stack
    from tokvel_common.infra.layout import Layout
    from tokvel_common.infra.process import InfraError

    if name == "env":
        sys.stdout.write("\n".join(stack.env_lines()) + "\n")
        return 0
    layout = Layout.from_environment()
    if name == "status":
        sys.stdout.write("\n".join(stack.render_status(layout)) + "\n")
        return 0
    # While we poll a starting broker, aiokafka logs each refused connection; with no logging
    # configured those would reach stderr through logging's last-resort handler.
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    actions: dict[str, Callable[[Layout], None]] = {
        "up": stack.up,
        "down": stack.down,
        "reset": stack.reset,
    }
    try:
        actions[name](layout)
    except InfraError as exc:
        sys.stderr.write(f"tokvel infra {name}: error: {exc}\n")
        return 1
    return 0
