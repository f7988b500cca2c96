"""``tokvel run ingestor``: the CMC poller in the foreground (SIGTERM stops it cleanly)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from ingestor import app
from ingestor.settings import IngestorSettings, settings_epilog
from tokvel_common.logging import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokvel run ingestor",
        description="Poll the CMC Pro API into cmc.quotes.raw (one replica polls at a time).",
        epilog=settings_epilog(IngestorSettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    settings = IngestorSettings()
    configure_logging("ingestor", settings.log_level)
    return asyncio.run(_serve(settings))


async def _serve(settings: IngestorSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return await app.run(settings, stop)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
