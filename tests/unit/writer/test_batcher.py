"""Batches bounded by size and time; decoding into samples, metadata and dead letters."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import orjson

from tests.support.recorded import metrics_sample
from tokvel_common.events import TokenInfo
from tokvel_common.serialization import encode
from writer.batcher import Batcher, Message, decode_batch

METRICS, INFO = "p.token.metrics", "p.cmc.tokens.info"
NOW = datetime(2025, 1, 1, tzinfo=UTC)
ROW = {
    "ts": "2017-08-10T00:00:05Z", "cmc_id": 1, "symbol": "BTC", "name": "Bitcoin",
    "slug": "bitcoin", "cmc_rank": 1, "price_usd": 3345.37, "market_cap_usd": 55193041650,
    "volume_24h_usd": 1470650000, "circulating_supply": 16498337, "total_supply": None,
    "max_supply": None, "percent_change_1h": 0.83, "percent_change_24h": -2.24,
    "percent_change_7d": 23.15, "last_updated": None, "flags": [],
}  # fmt: skip


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _messages(n: int, partition: int = 0, start: int = 0) -> list[Message]:
    return [Message(METRICS, partition, start + i, b"1", b"{}") for i in range(n)]


def test_a_batch_is_due_when_full() -> None:
    batcher = Batcher(max_rows=5, max_seconds=60, clock=FakeClock())
    batcher.add(_messages(4))
    assert not batcher.due() and batcher.room() == 1
    batcher.add(_messages(1, start=4))
    assert batcher.due() and batcher.room() == 1  # never asks Kafka for 0


def test_a_batch_is_due_when_its_first_message_is_old_enough() -> None:
    clock = FakeClock()
    batcher = Batcher(max_rows=100, max_seconds=2.0, clock=clock)
    assert batcher.seconds_until_due() == math.inf and not batcher.due()
    batcher.add(_messages(1))
    clock.now += 1.5
    batcher.add(_messages(1, start=1))  # a later message does not restart the clock
    assert batcher.seconds_until_due() == 0.5
    clock.now += 0.5
    assert batcher.due()


def test_take_gives_the_offsets_to_commit_per_partition() -> None:
    batcher = Batcher(max_rows=100, max_seconds=1, clock=FakeClock())
    batcher.add([*_messages(3, partition=0, start=10), *_messages(2, partition=4, start=7)])
    batcher.add([Message(INFO, 0, 3, b"9", b"{}")])
    batch = batcher.take()
    assert len(batch.messages) == 6
    assert batch.offsets == {(METRICS, 0): 13, (METRICS, 4): 9, (INFO, 0): 4}
    assert len(batcher) == 0 and not batcher.due()


def test_discard_forgets_revoked_partitions_only() -> None:
    batcher = Batcher(max_rows=100, max_seconds=1, clock=FakeClock())
    batcher.add([*_messages(3, partition=0), *_messages(2, partition=1)])
    assert batcher.discard([(METRICS, 1), (INFO, 0)]) == 2
    assert {m.partition for m in batcher.take().messages} == {0}
    batcher.add(_messages(2, partition=1))
    batcher.discard([(METRICS, 1)])
    assert batcher.seconds_until_due() == math.inf


def test_decode_splits_samples_metadata_and_dead_letters() -> None:
    sample = metrics_sample(ROW)
    info = TokenInfo(cmc_id=1, symbol="BTC", fetched_at=NOW)
    too_fast = sample.model_copy(update={"velocity": 100.5})
    messages = [
        Message(METRICS, 0, 0, b"1", encode(sample)),
        Message(INFO, 2, 0, b"1", encode(info)),
        Message(METRICS, 0, 1, b"1", b"not json"),
        Message(METRICS, 0, 2, b"1", orjson.dumps({"cmc_id": 1})),
        Message(METRICS, 0, 3, b"1", encode(too_fast)),
        Message(INFO, 2, 1, b"5", None),
    ]
    decoded = decode_batch(messages, metrics_topic=METRICS, info_topic=INFO, now=NOW)
    assert decoded.samples == [sample]
    assert decoded.infos == [info]
    assert decoded.tombstones == 1
    reasons = [(key, letter.reason, letter.offset) for key, letter in decoded.rejected]
    assert reasons == [
        (b"1", "invalid_json", 1),
        (b"1", "schema_violation", 2),
        (b"1", "velocity_out_of_range", 3),
    ]
    assert decoded.rejected[0][1].raw == "not json"
    assert decoded.rejected[0][1].topic == METRICS


def test_no_number_reaches_the_rows_as_nan_or_infinity() -> None:
    # copy_line writes numbers as they are: a non-finite one must be a dead letter before.
    value = encode(metrics_sample(ROW))
    messages = [
        Message(METRICS, 0, offset, b"1", value.replace(b'"price_usd":3345.37', literal))
        for offset, literal in enumerate(
            [b'"price_usd":NaN', b'"price_usd":Infinity', b'"price_usd":-1e999']
        )
    ]
    decoded = decode_batch(messages, metrics_topic=METRICS, info_topic=INFO, now=NOW)
    assert decoded.samples == []
    assert [letter.reason for _, letter in decoded.rejected] == ["invalid_json"] * 3
