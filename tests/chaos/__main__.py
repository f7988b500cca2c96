"""``python -m tests.chaos`` (``make chaos``, ``make chaos-quick``): see the package docstring."""

from __future__ import annotations

import os
import sys

from tests.chaos.environment import SharedStackError, private_stack


def main() -> int:
    try:
        env = private_stack(os.environ)
    except SharedStackError as exc:
        print(f"python -m tests.chaos: {exc}", file=sys.stderr)
        return 2
    if env != dict(os.environ):
        # The stack's ports are fixed at import: start over in the settled environment.
        argv = [sys.executable, "-m", "tests.chaos", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    from tests.chaos.runner import main as run

    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
