"""A minimal Faust app for the smoke test: counts words per key in a table, echoes counts out.

Configured from the environment by the test that launches it as a real worker process.
"""

from __future__ import annotations

import os

import faust

PREFIX = os.environ["SMOKE_PREFIX"]

app = faust.App(
    f"{PREFIX}smoke",
    broker=f"kafka://{os.environ['KAFKA_BOOTSTRAP_SERVERS']}",
    store="memory://",
    topic_partitions=2,
    web_enabled=False,
    datadir=os.environ["SMOKE_DATADIR"],  # not the current directory: tests leave nothing behind
)
words = app.topic(f"{PREFIX}words", key_type=bytes, value_type=bytes, value_serializer="raw")
counts_out = app.topic(f"{PREFIX}counts", key_type=bytes, value_type=bytes, value_serializer="raw")
counts = app.Table("counts", default=int, partitions=2)


@app.agent(words)
async def count_words(stream: faust.StreamT[bytes]) -> None:
    async for key, _word in stream.items():
        counts[key] += 1
        await counts_out.send(key=key, value=str(counts[key]).encode())
