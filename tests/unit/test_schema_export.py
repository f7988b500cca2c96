"""The checked-in JSON Schemas are exactly what the models export (run `make schemas`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokvel_common.schema_export import EXPORTED, SCHEMA_DIR, schema_texts, write_schemas


@pytest.mark.parametrize("name", sorted(EXPORTED))
def test_checked_in_schema_equals_the_export(name: str) -> None:
    checked_in = SCHEMA_DIR / name
    assert checked_in.is_file(), f"{checked_in} is missing: run `make schemas`"
    assert checked_in.read_text(encoding="utf-8") == schema_texts()[name], (
        f"{name} is out of date: run `make schemas`"
    )


def test_the_sample_schema_lists_the_architecture_fields() -> None:
    schema = json.loads((SCHEMA_DIR / "metrics_sample.json").read_text(encoding="utf-8"))
    fields = [
        "cmc_id", "symbol", "name", "slug", "ts", "price_usd", "market_cap_usd",
        "volume_24h_usd", "circulating_supply", "total_supply", "max_supply",
        "percent_change_1h", "percent_change_24h", "percent_change_7d", "velocity",
        "velocity_1h", "velocity_4h", "velocity_12h", "velocity_24h", "velocity_7d", "trend",
        "data_quality_score", "quality_flags", "schema_version",
    ]  # fmt: skip
    assert set(fields) <= set(schema["properties"])


def test_write_schemas_writes_every_file(tmp_path: Path) -> None:
    written = write_schemas(tmp_path)
    assert sorted(path.name for path in written) == sorted(EXPORTED)
    for path in written:
        assert path.read_text(encoding="utf-8") == schema_texts()[path.name]
