"""Per-token sequence numbers and the bounded buffer that lets a reconnecting client resume.

Sequence numbers
    ``seq = partition * 2**40 + offset`` of the sample's record in ``token.metrics``. A token's
    samples are keyed by its CMC id, so they all live in one partition, where offsets only grow:
    seq grows with every update of a token. It is computed from Kafka's coordinates alone, so
    every instance gives the same sample the same seq and a client may resume on any instance.
    Seqs are not contiguous (other tokens share the partition, transaction markers take
    offsets): clients compare them, never count them. The partition in the high bits (2**40
    offsets is a thousand years at 30 samples/s) means that if the topic is ever re-partitioned
    and a token moves, a seq from the old partition is recognised as foreign and answered with a
    snapshot instead of being compared with offsets of another partition.

Resume
    Per token, the last ``per_token`` update frames (already encoded) and a *floor*: every
    update of the token with a seq above the floor is in the buffer. A resume from ``s`` can be
    served iff ``s >= floor``; otherwise the gap is too old and the caller sends a snapshot.
    The floor starts at the position the instance began reading the partition at, rises as
    entries are evicted, and stays put otherwise. Tokens never seen since the start have no
    entries: for them the partition's floor answers (nothing of theirs was read above it).
    When the buffer holds more than ``max_entries`` in total, the least recently updated
    token is dropped whole and its partition's floor raised to its last seq, which keeps the
    rule exact: a resume is either complete or refused, never silently short.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from tokvel_common.events import MetricsSample

SEQ_PARTITION_SHIFT: Final = 40
MAX_OFFSET: Final = (1 << SEQ_PARTITION_SHIFT) - 1


def make_seq(partition: int, offset: int) -> int:
    if not 0 <= offset <= MAX_OFFSET or partition < 0:
        raise ValueError(f"no seq for partition {partition}, offset {offset}")
    return (partition << SEQ_PARTITION_SHIFT) | offset


def seq_partition(seq: int) -> int:
    return seq >> SEQ_PARTITION_SHIFT


def seq_offset(seq: int) -> int:
    return seq & MAX_OFFSET


@dataclass(slots=True)
class _History:
    partition: int
    floor: int  # every update of this token with a greater seq is in `entries`
    entries: deque[tuple[int, bytes]] = field(default_factory=deque)
    newest: MetricsSample | None = None  # the latest in event time (a late sample is not)


class ResumeBuffer:
    def __init__(self, per_token: int, max_entries: int) -> None:
        if per_token < 1 or max_entries < per_token:
            raise ValueError("need per_token >= 1 and max_entries >= per_token")
        self._per_token = per_token
        self._max_entries = max_entries
        self._entries = 0
        self._floors: dict[int, int] = {}
        self._histories: OrderedDict[int, _History] = OrderedDict()

    # ------------------------------------------------------------------------------- writes

    def start_partition(self, partition: int, next_offset: int) -> None:
        """The instance reads ``partition`` from ``next_offset`` on (and saw nothing before)."""
        floor = (partition << SEQ_PARTITION_SHIFT) + next_offset - 1
        self._floors[partition] = max(floor, self._floors.get(partition, floor))

    def record(self, token_id: int, seq: int, frame: bytes, sample: MetricsSample) -> None:
        partition = seq_partition(seq)
        history = self._histories.get(token_id)
        if history is None or history.partition != partition:
            if history is not None:  # the topic was re-partitioned: start over for this token
                self._drop(token_id)
            floor = self._floors.get(partition, seq - 1)
            history = _History(partition, floor)
            self._histories[token_id] = history
        else:
            self._histories.move_to_end(token_id)
        history.entries.append((seq, frame))
        self._entries += 1
        if len(history.entries) > self._per_token:
            history.floor = history.entries.popleft()[0]
            self._entries -= 1
        if history.newest is None or sample.ts >= history.newest.ts:
            history.newest = sample
        while self._entries > self._max_entries:
            self._drop(next(iter(self._histories)))

    def _drop(self, token_id: int) -> None:
        history = self._histories.pop(token_id)
        self._entries -= len(history.entries)
        if history.entries:
            last = history.entries[-1][0]
            self._floors[history.partition] = max(last, self._floors.get(history.partition, last))

    # -------------------------------------------------------------------------------- reads

    def since(self, token_id: int, seq: int) -> list[bytes] | None:
        """The frames of the token's updates after ``seq``, or None when some are missing."""
        partition = seq_partition(seq)
        history = self._histories.get(token_id)
        if history is None:
            floor = self._floors.get(partition)
            return None if floor is None or seq < floor else []
        if history.partition != partition or seq < history.floor:
            return None
        return [frame for entry_seq, frame in history.entries if entry_seq > seq]

    def last_seq(self, token_id: int) -> int | None:
        history = self._histories.get(token_id)
        return history.entries[-1][0] if history is not None and history.entries else None

    def newest(self, token_id: int) -> MetricsSample | None:
        history = self._histories.get(token_id)
        return history.newest if history is not None else None

    @property
    def tokens(self) -> int:
        return len(self._histories)

    @property
    def entries(self) -> int:
        return self._entries
