"""``tokvel run writer``: persist token.metrics into PostgreSQL and keep Redis hot."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from writer import app
from writer.settings import WriterSettings


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tokvel run writer",
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Every setting is an environment variable (see services/writer/README.md).",
    )
    parser.parse_args(argv)
    settings = WriterSettings()
    return asyncio.run(app.run(settings))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
