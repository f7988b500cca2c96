"""The baseline of the velocity benchmarks: a bare Faust agent iterating cmc.quotes.raw.

Same broker, topic definition (raw bytes: ``velocity.topics.define_topics``), serializers,
logging and garbage-collector settings (``velocity.app.tune_garbage_collector``) as the velocity
worker, and no work per message: what Faust itself costs per message.
Prints one JSON line with the seconds (wall clock and CPU) between its first and its
BENCH_QUOTES-th message, then idles until SIGTERM. Configured from the environment by the
benchmark (KAFKA_BOOTSTRAP_SERVERS, TOPIC_PREFIX, BENCH_QUOTES, BENCH_DATA_DIR).
"""

from __future__ import annotations

import os
import sys
import time

import faust
import orjson

from tokvel_common.logging import configure_logging
from tokvel_common.settings import CommonSettings
from velocity.app import tune_garbage_collector
from velocity.topics import define_topics


def main() -> int:
    settings = CommonSettings()
    quotes = int(os.environ["BENCH_QUOTES"])
    configure_logging("bench-bare-agent", "WARNING")
    app = faust.App(
        f"{settings.topic_prefix}bare-agent",
        broker=f"kafka://{settings.kafka_bootstrap_servers}",
        store="memory://",
        datadir=os.environ["BENCH_DATA_DIR"],
        autodiscover=False,
        web_enabled=False,
        topic_disable_leader=True,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
    )
    raw = define_topics(app, settings).raw

    @app.agent(raw)
    async def count(stream: faust.StreamT[bytes]) -> None:
        seen = 0
        first = first_cpu = 0.0
        async for _ in stream:
            seen += 1
            if seen == 1:
                first, first_cpu = time.perf_counter(), time.process_time()
            elif seen == quotes:
                report = {
                    "seconds": time.perf_counter() - first,
                    "cpu_seconds": time.process_time() - first_cpu,
                }
                print(orjson.dumps(report).decode(), flush=True)  # noqa: T201

    tune_garbage_collector()
    worker = faust.Worker(app, override_logging=False, redirect_stdouts=False, quiet=True)
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
