"""The recording as CMC answers: shapes checked against the untouched real Pro API answers."""

from __future__ import annotations

import gzip
import itertools
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ingestor.replay_data import (
    ReplayDataMissingError,
    iter_snapshots,
    scan_catalog,
    to_cmc_entry,
    to_cmc_info,
)
from ingestor.replay_server import sort_rows
from tokvel_common.events import CmcListingEntry
from tokvel_common.paths import SHARED_DATA_DIR
from tokvel_common.settings import CommonSettings

REAL_V1 = SHARED_DATA_DIR / "cmc-pro-api" / "listings_v1_2021-04-20T23-30-09Z.json"


@pytest.fixture(scope="module")
def recording() -> Path:
    return CommonSettings().tokvel_replay_data


@pytest.fixture(scope="module")
def first_rows(recording: Path) -> list[dict[str, Any]]:
    with gzip.open(recording, "rt") as stream:
        return [json.loads(line) for line in itertools.islice(stream, 600)]


def test_snapshots_group_consecutive_rows_of_one_time(recording: Path) -> None:
    snapshots = list(iter_snapshots(recording, limit=3))
    assert [s.index for s in snapshots] == [0, 1, 2]
    for snapshot in snapshots:
        assert {row["ts"] for row in snapshot.rows} == {snapshot.ts.strftime("%Y-%m-%dT%H:%M:%SZ")}
        assert len({row["cmc_id"] for row in snapshot.rows}) == len(snapshot.rows)
        ranks = [row["cmc_rank"] for row in snapshot.rows]
        assert ranks == sorted(ranks)
    assert snapshots[0].ts == datetime(2017, 8, 10, 0, 0, 5, tzinfo=UTC)
    assert snapshots[0].ts < snapshots[1].ts < snapshots[2].ts


def test_catalog_counts_snapshots_and_knows_every_token(recording: Path) -> None:
    catalog = scan_catalog(recording, limit=5)
    assert catalog.snapshots == 5
    btc = catalog.tokens[1]
    assert (btc.symbol, btc.name, btc.slug, btc.date_added) == ("BTC", "Bitcoin", "bitcoin", None)


def test_a_missing_recording_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(ReplayDataMissingError, match="TOKVEL_REPLAY_DATA"):
        list(iter_snapshots(tmp_path / "nope.jsonl.gz"))


def _shape(value: Any) -> Any:
    """Keys (in order) and JSON types, recursively: what a CMC client depends on."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    return type(value).__name__


def test_v1_entries_have_the_real_answers_keys_in_its_order(
    first_rows: list[dict[str, Any]],
) -> None:
    real = json.loads(REAL_V1.read_text())["data"][0]
    ours = to_cmc_entry(first_rows[0], "v1")
    assert list(ours) == list(real)
    assert list(ours["quote"]["USD"]) == list(real["quote"]["USD"])
    # Same JSON types wherever the recording has the value; null where it does not.
    for key in ("id", "name", "symbol", "slug", "cmc_rank", "last_updated", "circulating_supply"):
        assert type(ours[key]) is type(real[key]), key
    for absent in (
        "num_market_pairs",
        "date_added",
        "tags",
        "total_supply",
        "max_supply",
        "platform",
    ):
        assert ours[absent] is None
    assert ours["quote"]["USD"]["percent_change_30d"] is None


def test_values_are_the_recorded_ones_and_last_updated_is_the_snapshot_time(
    first_rows: list[dict[str, Any]],
) -> None:
    for row in first_rows:
        for version in ("v1", "v3"):
            entry = CmcListingEntry.model_validate(to_cmc_entry(row, version))
            usd = entry.quote_in("USD")
            assert usd is not None
            assert entry.id == row["cmc_id"] and entry.cmc_rank == row["cmc_rank"]
            assert usd.price == row["price_usd"]
            assert usd.market_cap == row["market_cap_usd"]
            assert usd.volume_24h == row["volume_24h_usd"]
            assert usd.percent_change_7d == row["percent_change_7d"]
            assert entry.circulating_supply == row["circulating_supply"]
            assert row["last_updated"] is None
            assert entry.event_time() == datetime.fromisoformat(row["ts"])


def test_v3_quotes_are_a_list_of_currency_objects(first_rows: list[dict[str, Any]]) -> None:
    entry = to_cmc_entry(first_rows[0], "v3")
    assert isinstance(entry["quote"], list) and len(entry["quote"]) == 1
    usd = entry["quote"][0]
    assert (usd["id"], usd["symbol"]) == (2781, "USD")
    assert entry["last_updated"] == "2017-08-10T00:00:05.000Z" == usd["last_updated"]


def test_aux_selects_the_optional_fields(first_rows: list[dict[str, Any]]) -> None:
    entry = to_cmc_entry(first_rows[0], "v1", frozenset({"cmc_rank", "volume_7d"}))
    assert list(entry) == ["id", "name", "symbol", "slug", "cmc_rank", "last_updated", "quote"]
    assert entry["quote"]["USD"]["volume_7d"] is None


def test_info_has_the_names_and_nothing_invented(recording: Path) -> None:
    info = to_cmc_info(scan_catalog(recording, limit=1).tokens[1027])
    assert (info["id"], info["symbol"], info["slug"]) == (1027, "ETH", "ethereum")
    assert info["description"] is None and info["logo"] is None and info["urls"] is None


def test_sorting_puts_nulls_last_and_keeps_rank_order_for_market_cap(
    first_rows: list[dict[str, Any]],
) -> None:
    snapshot = [r for r in first_rows if r["ts"] == first_rows[0]["ts"]]
    assert sort_rows(snapshot, "market_cap", "desc") == snapshot
    assert sort_rows(snapshot, "market_cap", "asc") == snapshot[::-1]
    by_volume = sort_rows(snapshot, "volume_24h", "desc")
    volumes = [r["volume_24h_usd"] for r in by_volume]
    known = [v for v in volumes if v is not None]
    assert known == sorted(known, reverse=True)
    assert volumes[len(known) :] == [None] * (len(volumes) - len(known))
    names = [r["name"].lower() for r in sort_rows(snapshot, "name", "asc")]
    assert names == sorted(names)
