"""JSON Schemas of the Kafka message values, exported from the pydantic models for consumers.

The checked-in files under ``tokvel_common/schemas/`` are what downstream consumers read; a
unit test fails when they differ from the models, so they never drift. After changing a
model, regenerate them with ``make schemas`` (``python -m tokvel_common.schema_export``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

from pydantic import BaseModel

from tokvel_common.events import DeadLetter, MetricsSample, RawQuote, TokenInfo

SCHEMA_DIR: Final = Path(__file__).resolve().parent / "schemas"

# File name -> the model of the messages it describes (serialization mode: the JSON on the wire).
EXPORTED: Final[dict[str, type[BaseModel]]] = {
    "metrics_sample.json": MetricsSample,  # token.metrics, token.metrics.latest
    "raw_quote.json": RawQuote,  # cmc.quotes.raw
    "dead_letter.json": DeadLetter,  # cmc.quotes.dlq
    "token_info.json": TokenInfo,  # cmc.tokens.info
}


def schema_texts() -> dict[str, str]:
    """Each exported file's content: the model's JSON Schema, indented, keys sorted."""
    return {
        name: json.dumps(model.model_json_schema(mode="serialization"), indent=2, sort_keys=True)
        + "\n"
        for name, model in EXPORTED.items()
    }


def write_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_texts().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_schemas():
        print(written_path)  # noqa: T201
