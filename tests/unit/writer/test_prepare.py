"""A batch's CPU work as a worker process does it: rows, retention, what is reported."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta

from tests.support.recorded import metrics_sample
from tests.unit.writer.test_batcher import INFO, METRICS, NOW, ROW
from tokvel_common.serialization import encode
from writer.maintenance import event_day
from writer.persister import prepare_batch


def test_prepare_batch_writes_the_samples_within_the_retention_and_reports_the_rest() -> None:
    old = metrics_sample(ROW)
    new = old.model_copy(update={"ts": old.ts + timedelta(days=1), "cmc_id": 2})
    messages = [
        (METRICS, 0, 0, b"1", encode(old)),
        (METRICS, 1, 0, b"2", encode(new)),
        (METRICS, 1, 1, b"2", b"not json"),
        (INFO, 0, 0, b"3", None),  # a tombstone
    ]
    prepared = prepare_batch(
        messages,
        metrics_topic=METRICS,
        info_topic=INFO,
        now=NOW,
        retention_floor=event_day(new.ts),
    )
    assert prepared.messages == 4
    assert prepared.expired == 1
    assert prepared.rows.cmc_ids == [2] and prepared.rows.token_cmc_ids == [2]
    assert prepared.days == {event_day(new.ts)}
    assert prepared.newest_event_time == new.ts == datetime(2017, 8, 11, 0, 0, 5, tzinfo=UTC)
    assert [(key, letter.reason) for key, letter in prepared.rejected] == [(b"2", "invalid_json")]
    # What a worker process sends back arrives whole.
    assert pickle.loads(pickle.dumps(prepared)) == prepared
