"""Reading what backfill loads: CMC JSON captures, recording JSONL and CSV, raw-topic JSONL."""

from __future__ import annotations

import csv
import gzip
import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingestor.backfill import count_records, iter_records, pace
from ingestor.replay_data import to_cmc_entry
from tokvel_common.events import CmcListingEntry
from tokvel_common.paths import SHARED_DATA_DIR
from tokvel_common.settings import CommonSettings

CAPTURE = SHARED_DATA_DIR / "cmc-pro-api" / "listings_v1_2020-10-24T06-32-03Z.json"


def test_a_cmc_capture_is_read_entry_by_entry_at_its_status_time() -> None:
    records = list(iter_records(CAPTURE, "v3"))
    assert len(records) == count_records(CAPTURE) == 100
    original = json.loads(CAPTURE.read_text())["data"]
    assert [r.entry for r in records] == original  # as received, whatever --api-version says
    captured = datetime(2020, 10, 24, 6, 32, 3, 858000, tzinfo=UTC)
    assert {(r.polled_at, r.listed_at) for r in records} == {(captured, captured)}


def test_recording_rows_become_cmc_entries_of_the_chosen_shape() -> None:
    recording = CommonSettings().tokvel_replay_data
    records = list(itertools.islice(iter_records(recording, "v1"), 400))
    with gzip.open(recording, "rt") as stream:
        rows = [json.loads(line) for line in itertools.islice(stream, 400)]
    for record, row in zip(records, rows, strict=True):
        assert record.entry == to_cmc_entry(row, "v1")
        assert record.polled_at == record.listed_at == datetime.fromisoformat(row["ts"])
        assert record.poll_id == f"backfill:{row['ts']}"
    assert isinstance(next(iter_records(recording, "v3")).entry["quote"], list)


def test_csv_with_the_recording_columns_gives_the_same_entries(tmp_path: Path) -> None:
    recording = CommonSettings().tokvel_replay_data
    with gzip.open(recording, "rt") as stream:
        rows = [json.loads(line) for line in itertools.islice(stream, 50)]
    path = tmp_path / "slice.csv"
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    records = list(iter_records(path, "v1"))
    assert count_records(path) == len(records) == 50
    for record, row in zip(records, rows, strict=True):
        from_csv = CmcListingEntry.model_validate(record.entry)
        from_json = CmcListingEntry.model_validate(to_cmc_entry(row, "v1"))
        assert from_csv.model_dump() == from_json.model_dump()


def test_jsonl_of_raw_topic_values_keeps_their_provenance(tmp_path: Path) -> None:
    entry = json.loads(CAPTURE.read_text())["data"][0]
    line = {
        **entry,
        "polled_at": "2020-10-24T06:32:05Z",
        "listed_at": "2020-10-24T06:32:03.858Z",
        "source": "cmc",
        "poll_id": "abc",
    }
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps(line) + "\n\n" + json.dumps(entry) + "\n")
    first, second = iter_records(path, "v3")
    assert first.poll_id == "abc" and first.polled_at == datetime(
        2020, 10, 24, 6, 32, 5, tzinfo=UTC
    )
    assert first.listed_at is not None
    # A bare entry was polled, at best, when CMC last updated it.
    assert second.polled_at == datetime(2020, 10, 24, 6, 30, 2, tzinfo=UTC)
    assert second.listed_at is None


def test_unknown_formats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "quotes.parquet"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a \.json capture"):
        count_records(path)


def test_pacing_keeps_the_rate() -> None:
    assert pace(sent=1000, rate=None, elapsed=0.1) == 0.0
    assert pace(sent=1000, rate=500.0, elapsed=0.5) == pytest.approx(1.5)
    assert pace(sent=1000, rate=500.0, elapsed=3.0) == 0.0


@pytest.mark.parametrize(
    "path", [CAPTURE, CommonSettings().tokvel_replay_data], ids=["json", "jsonl"]
)
def test_skipping_resumes_at_the_same_record(path: Path) -> None:
    everything = list(itertools.islice(iter_records(path, "v3"), 60))
    resumed = list(itertools.islice(iter_records(path, "v3", skip=25), 35))
    assert resumed == everything[25:]
