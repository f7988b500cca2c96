"""Sequence numbers and the resume buffer: a resume is complete or refused, never short."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.ws import make_sample
from ws_broadcaster.resume import (
    MAX_OFFSET,
    ResumeBuffer,
    make_seq,
    seq_offset,
    seq_partition,
)


def test_seq_encodes_partition_and_offset() -> None:
    seq = make_seq(5, 123)
    assert (seq_partition(seq), seq_offset(seq)) == (5, 123)
    assert make_seq(0, 7) == 7
    assert make_seq(1, 0) > make_seq(0, MAX_OFFSET)
    # Two instances compute the same seq for the same record: no state involved.
    assert make_seq(3, 10) == make_seq(3, 10)
    with pytest.raises(ValueError):
        make_seq(0, -1)
    with pytest.raises(ValueError):
        make_seq(0, MAX_OFFSET + 1)


def _record(buffer: ResumeBuffer, token: int, partition: int, offset: int) -> int:
    seq = make_seq(partition, offset)
    buffer.record(token, seq, f"{token}@{offset}".encode(), make_sample(token, minute=offset))
    return seq


def test_replays_what_came_after() -> None:
    buffer = ResumeBuffer(per_token=10, max_entries=100)
    buffer.start_partition(2, 100)
    seqs = [_record(buffer, 1, 2, offset) for offset in (100, 103, 107)]
    assert buffer.since(1, seqs[0]) == [b"1@103", b"1@107"]
    assert buffer.since(1, seqs[2]) == []
    assert buffer.last_seq(1) == seqs[2]
    # From before the first one: still complete, since the instance read from offset 100 on.
    assert buffer.since(1, make_seq(2, 99)) == [b"1@100", b"1@103", b"1@107"]


def test_gap_older_than_the_instance_is_refused() -> None:
    buffer = ResumeBuffer(per_token=10, max_entries=100)
    buffer.start_partition(2, 100)
    _record(buffer, 1, 2, 100)
    assert buffer.since(1, make_seq(2, 98)) is None  # offset 99 may have been token 1's


def test_gap_older_than_the_ring_is_refused() -> None:
    buffer = ResumeBuffer(per_token=3, max_entries=100)
    buffer.start_partition(0, 0)
    seqs = [_record(buffer, 1, 0, offset) for offset in range(0, 10, 2)]  # 0 2 4 6 8
    # The ring holds 4, 6, 8: resuming from 2 is complete, from 0 is not (2 was evicted).
    assert buffer.since(1, seqs[1]) == [b"1@4", b"1@6", b"1@8"]
    assert buffer.since(1, seqs[0]) is None
    assert buffer.entries == 3


def test_token_never_seen_since_start() -> None:
    buffer = ResumeBuffer(per_token=3, max_entries=100)
    buffer.start_partition(1, 50)
    _record(buffer, 9, 1, 60)  # another token of the partition
    assert buffer.since(1, make_seq(1, 49)) == []  # nothing of token 1 since offset 50
    assert buffer.since(1, make_seq(1, 10)) is None  # before the instance started
    assert buffer.since(1, make_seq(4, 10)) is None  # a partition not read
    assert buffer.last_seq(1) is None
    assert buffer.newest(1) is None


def test_seq_from_another_partition_is_a_gap() -> None:
    buffer = ResumeBuffer(per_token=3, max_entries=100)
    buffer.start_partition(0, 0)
    buffer.start_partition(1, 0)
    _record(buffer, 1, 0, 5)
    assert buffer.since(1, make_seq(1, 900)) is None


def test_eviction_of_whole_tokens_raises_the_partition_floor() -> None:
    buffer = ResumeBuffer(per_token=2, max_entries=4)
    buffer.start_partition(0, 0)
    _record(buffer, 1, 0, 1)
    _record(buffer, 1, 0, 2)
    _record(buffer, 2, 0, 3)
    _record(buffer, 2, 0, 4)
    _record(buffer, 3, 0, 5)  # 5 entries > 4: token 1 (least recently updated) goes
    assert buffer.tokens == 2
    assert buffer.entries == 3
    assert buffer.last_seq(1) is None
    assert buffer.since(1, make_seq(0, 0)) is None  # its updates 1 and 2 are gone
    assert buffer.since(1, make_seq(0, 2)) == []  # had everything: nothing missed since
    assert buffer.since(2, make_seq(0, 0)) == [b"2@3", b"2@4"]


def test_newest_is_by_event_time() -> None:
    buffer = ResumeBuffer(per_token=5, max_entries=50)
    buffer.start_partition(0, 0)
    buffer.record(1, make_seq(0, 1), b"a", make_sample(1, minute=10))
    buffer.record(1, make_seq(0, 2), b"b", make_sample(1, minute=4))  # a late sample
    newest = buffer.newest(1)
    assert newest is not None and newest.ts == make_sample(1, minute=10).ts
    assert buffer.last_seq(1) == make_seq(0, 2)


@settings(max_examples=200, deadline=None)
@given(
    per_token=st.integers(1, 5),
    max_entries=st.integers(5, 12),
    tokens=st.lists(st.integers(1, 4), min_size=1, max_size=60),
    resume_token=st.integers(1, 4),
    resume_after=st.integers(0, 70),
)
def test_a_resume_is_complete_or_refused(
    per_token: int, max_entries: int, tokens: list[int], resume_token: int, resume_after: int
) -> None:
    """Against a full log: whatever is replayed is exactly the token's records after seq."""
    buffer = ResumeBuffer(per_token=per_token, max_entries=max_entries)
    buffer.start_partition(0, 0)
    log = []
    for offset, token in enumerate(tokens):
        _record(buffer, token, 0, offset)
        log.append((token, offset))
    frames = buffer.since(resume_token, make_seq(0, resume_after))
    expected = [f"{t}@{o}".encode() for t, o in log if t == resume_token and o > resume_after]
    if frames is not None:
        assert frames == expected
    assert buffer.entries <= max_entries
    # Without whole-token evictions, the newest `per_token` updates of a token are resumable.
    last_token = tokens[-1]
    own = [o for t, o in log if t == last_token]
    if len(own) > per_token and max_entries >= per_token * len(set(tokens)):
        assert buffer.since(last_token, make_seq(0, own[-per_token - 1])) is not None
