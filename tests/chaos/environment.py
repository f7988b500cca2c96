"""Which stack the chaos suite breaks: a private one, never the shared default stack.

The suite kills Kafka, PostgreSQL and Redis, so it runs on a second local stack
(``tokvel infra``, ports shifted by ``TOKVEL_PORT_OFFSET``, state in ``TOKVEL_RUN_DIR``):

- ``TOKVEL_PORT_OFFSET`` set (not 0): that stack, in ``TOKVEL_RUN_DIR`` if set too, else in
  ``.run/chaos-<offset>``;
- unset: offset 2000 in ``.run/chaos`` (any ``TOKVEL_RUN_DIR`` is then ignored: it belongs to a
  stack on the default ports);
- 0: refused.

Every port of the stack module is fixed when :mod:`tokvel_common.localstack` is imported, so
the entry point settles the environment first and runs the suite in a process started with it.
The services run on ``TOKVEL_CHAOS_PORT_BASE`` (19000) and the next 19 ports.
"""

from __future__ import annotations

from collections.abc import Mapping

from tokvel_common.infra.layout import RUN_DIR_ENV
from tokvel_common.localstack import PORT_OFFSET_ENV
from tokvel_common.paths import PROJECT_ROOT

DEFAULT_PORT_OFFSET = 2000
PORT_BASE_ENV = "TOKVEL_CHAOS_PORT_BASE"
DEFAULT_PORT_BASE = 19000


class SharedStackError(Exception):
    """The environment names the default stack, which others use."""


def private_stack(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the offset and run dir of the private stack the suite may break."""
    offset_text = environ.get(PORT_OFFSET_ENV, "").strip()
    if not offset_text:
        offset, run_dir = DEFAULT_PORT_OFFSET, str(PROJECT_ROOT / ".run" / "chaos")
    else:
        offset = int(offset_text)
        run_dir = environ.get(RUN_DIR_ENV) or str(PROJECT_ROOT / ".run" / f"chaos-{offset}")
    if offset == 0:
        raise SharedStackError(
            f"{PORT_OFFSET_ENV}=0 is the default stack, shared with everything else on this "
            "machine: the chaos suite breaks the stack it runs on, give it a private one "
            f"(leave {PORT_OFFSET_ENV} unset for offset {DEFAULT_PORT_OFFSET})"
        )
    return {**environ, PORT_OFFSET_ENV: str(offset), RUN_DIR_ENV: run_dir}
