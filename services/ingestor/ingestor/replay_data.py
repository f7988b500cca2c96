"""The recorded CMC data (``../shared/data/*.jsonl.gz``) and the CMC shapes built from it.

A recording is one JSON object per (snapshot, token), sorted by snapshot time ``ts`` then rank
(see ``shared/data/README.md``). Snapshots are streamed: only the one being served is in memory,
so a month of data costs no more than one snapshot. Fields a recording lacks stay ``null`` in
every CMC answer built from it; only ``last_updated`` falls back to the snapshot time.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from tokvel_common.serialization import loads

Row = dict[str, Any]

USD_ID = 2781  # CMC's id of the US dollar, the `id` of a v3 USD quote

# Fields of a listing entry CMC returns only when `aux` names them; this is CMC's default `aux`.
DEFAULT_AUX = (
    "num_market_pairs",
    "cmc_rank",
    "date_added",
    "tags",
    "platform",
    "max_supply",
    "circulating_supply",
    "total_supply",
)
EXTRA_AUX = (
    "market_cap_by_total_supply",
    "volume_24h_reported",
    "volume_7d",
    "volume_7d_reported",
    "volume_30d",
    "volume_30d_reported",
    "is_market_cap_included_in_calc",
)
ALL_AUX = DEFAULT_AUX + EXTRA_AUX
# The optional aux fields that CMC puts inside each quote rather than on the entry.
_QUOTE_AUX = frozenset(EXTRA_AUX) - {"is_market_cap_included_in_calc"}
# Entry-level aux fields in the order CMC writes them (the untouched answers in shared/data).
_ENTRY_AUX_ORDER = (
    "num_market_pairs",
    "date_added",
    "tags",
    "max_supply",
    "circulating_supply",
    "total_supply",
    "platform",
    "is_market_cap_included_in_calc",
    "cmc_rank",
)
# Recording column behind each entry field; fields without one are not in the recording (null).
_ENTRY_COLUMNS = {
    "date_added": "date_added",
    "max_supply": "max_supply",
    "circulating_supply": "circulating_supply",
    "total_supply": "total_supply",
    "cmc_rank": "cmc_rank",
}
_QUOTE_COLUMNS = {
    "price": "price_usd",
    "volume_24h": "volume_24h_usd",
    "percent_change_1h": "percent_change_1h",
    "percent_change_24h": "percent_change_24h",
    "percent_change_7d": "percent_change_7d",
    "percent_change_30d": None,
    "percent_change_60d": None,
    "percent_change_90d": None,
    "market_cap": "market_cap_usd",
}


class ReplayDataMissingError(FileNotFoundError):
    """The recording is not where the settings point; the message says what to set."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"recorded CMC data not found at {path}: set TOKVEL_REPLAY_DATA (or pass --data) to a "
            "recording such as ../shared/data/cmc-web-2017-08-10_5min_top200.jsonl.gz"
        )
        self.path = path


def open_text(path: Path) -> BinaryIO:
    """The file's bytes, gunzipped when its name ends in ``.gz``."""
    if not path.is_file():
        raise ReplayDataMissingError(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value] # GzipFile is a binary stream; typeshed types it apart
    return path.open("rb")


def iter_rows(path: Path) -> Iterator[Row]:
    with open_text(path) as stream:
        for line in stream:
            if line.strip():
                yield loads(line)


@dataclass(frozen=True)
class Snapshot:
    index: int
    ts: datetime
    rows: list[Row]


def iter_snapshots(path: Path, limit: int | None = None) -> Iterator[Snapshot]:
    """Consecutive rows sharing a ``ts`` as one snapshot each, at most ``limit`` of them."""
    index, current_ts = 0, None
    rows: list[Row] = []
    for row in iter_rows(path):
        if row["ts"] != current_ts:
            if rows:
                yield Snapshot(index, parse_time(current_ts), rows)
                index += 1
                if limit is not None and index >= limit:
                    return
            current_ts, rows = row["ts"], []
        rows.append(row)
    if rows:
        yield Snapshot(index, parse_time(current_ts), rows)


@dataclass(frozen=True)
class CatalogEntry:
    """What a recording knows of a token for ``/v2/cryptocurrency/info`` (its latest names)."""

    cmc_id: int
    name: str | None
    symbol: str | None
    slug: str | None
    date_added: str | None


@dataclass(frozen=True)
class Catalog:
    snapshots: int
    tokens: dict[int, CatalogEntry]


def scan_catalog(path: Path, limit: int | None = None) -> Catalog:
    """One pass over the recording: how many snapshots it has and every token it names."""
    tokens: dict[int, CatalogEntry] = {}
    count = 0
    for snapshot in iter_snapshots(path, limit):
        count += 1
        for row in snapshot.rows:
            tokens[row["cmc_id"]] = CatalogEntry(
                row["cmc_id"], row.get("name"), row.get("symbol"), row.get("slug"),
                cmc_time(row.get("date_added")),
            )  # fmt: skip
    return Catalog(count, tokens)


def parse_time(value: Any) -> datetime:
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def format_cmc_time(value: datetime) -> str:
    """CMC's timestamp format: UTC, milliseconds, ``Z`` (``2021-04-20T23:29:02.000Z``)."""
    value = value.astimezone(UTC)
    return f"{value:%Y-%m-%dT%H:%M:%S}.{value.microsecond // 1000:03d}Z"


def cmc_time(value: Any) -> str | None:
    return None if value is None else format_cmc_time(parse_time(value))


def to_cmc_entry(row: Row, version: str, aux: frozenset[str] = frozenset(DEFAULT_AUX)) -> Row:
    """One recorded row as a ``/v1`` (quote a map) or ``/v3`` (quote a list) listing entry."""
    last_updated = cmc_time(row.get("last_updated")) or cmc_time(row["ts"])
    entry: Row = {
        "id": row["cmc_id"],
        "name": row.get("name"),
        "symbol": row.get("symbol"),
        "slug": row.get("slug"),
    }
    for field in _ENTRY_AUX_ORDER:
        if field in aux:
            column = _ENTRY_COLUMNS.get(field)
            value = row.get(column) if column else None
            entry[field] = cmc_time(value) if field == "date_added" else value
    entry["last_updated"] = last_updated
    usd: Row = {field: row.get(col) if col else None for field, col in _QUOTE_COLUMNS.items()}
    for field in EXTRA_AUX:
        if field in aux and field in _QUOTE_AUX:
            usd[field] = None
    usd["last_updated"] = last_updated
    entry["quote"] = [{"id": USD_ID, "symbol": "USD", **usd}] if version == "v3" else {"USD": usd}
    return entry


def to_cmc_info(token: CatalogEntry) -> Row:
    """A ``/v2/cryptocurrency/info`` object: the recording has names only, the rest is null."""
    return {
        "id": token.cmc_id,
        "name": token.name,
        "symbol": token.symbol,
        "category": None,
        "description": None,
        "slug": token.slug,
        "logo": None,
        "subreddit": None,
        "notice": None,
        "tags": None,
        "tag-names": None,
        "tag-groups": None,
        "urls": None,
        "platform": None,
        "date_added": token.date_added,
        "twitter_username": None,
        "is_hidden": None,
        "date_launched": None,
        "contract_address": None,
        "self_reported_circulating_supply": None,
        "self_reported_tags": None,
        "self_reported_market_cap": None,
        "infinite_supply": None,
    }
