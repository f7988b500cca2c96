"""``tokvel run velocity``: one velocity worker in the foreground (SIGTERM stops it cleanly)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import faust

from tokvel_common.logging import configure_logging
from tokvel_common.settings import settings_epilog
from velocity.app import create_app, tune_garbage_collector
from velocity.settings import VelocitySettings
from velocity.web import OpsServer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokvel run velocity",
        description="Velocity, rolling windows, trend and quality of each quote of cmc.quotes.raw.",
        epilog=settings_epilog(VelocitySettings),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.parse_args(argv)
    settings = VelocitySettings()
    configure_logging("velocity", settings.log_level)
    app = create_app(settings)
    tune_garbage_collector()
    worker = faust.Worker(
        app,
        OpsServer(app, settings.velocity_ops_host, settings.velocity_ops_port),
        # Our JSON logging stays in place: Faust's would also set the root logger's level.
        override_logging=False,
        redirect_stdouts=False,
        quiet=True,
    )
    worker.spinner = None  # it writes terminal escapes into the JSON log stream; logs "Ready"
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
