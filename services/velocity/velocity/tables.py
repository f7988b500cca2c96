"""The per-token state table: its value format and a write path whose durability is awaited.

One entry per token, key = the Kafka key (the cmc_id in ASCII), value = :class:`TokenState`:
the token's :class:`~tokvel_common.velocity_math.TokenWindows` plus the partition and offset of
the last input applied to it, which is what makes replayed input idempotent (see agents.py).

Why not ``table[key] = value``: Faust's ``Table.__setitem__`` hands the changelog record to its
``ProducerBuffer`` (``send_soon``) and drops the delivery future. Faust does call
``producer.flush()`` before it commits source offsets, but that flush is not strict: the buffer's
``flush_atmost`` gives up after 0.1 s without progress, and a record already taken off the
buffer but not yet handed to aiokafka is in neither queue. A commit could therefore cover input
whose state never reached the changelog, and a restart would lose it. :meth:`StateTable.store`
instead writes the local store and returns the changelog record, which the agent publishes
itself and whose acknowledgement (acks=all) it awaits before the batch's input is acked, so no
commit can overtake its state.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import faust
from faust.streams import _current_event

from tokvel_common.velocity_math import TokenWindows
from velocity.publish import Record, Written

STATE_TABLE: Final = "token-state"

# format version, partition and offset of the last applied input, then the TokenWindows bytes.
_STATE_HEADER: Final = struct.Struct("<Biq")
_STATE_VERSION: Final = 1
_NOTHING_APPLIED: Final = -1


@dataclass(slots=True)
class TokenState:
    windows: TokenWindows
    partition: int = _NOTHING_APPLIED
    offset: int = _NOTHING_APPLIED

    def has_applied(self, partition: int, offset: int) -> bool:
        """Whether the input at (partition, offset) is already counted in this state."""
        return partition == self.partition and offset <= self.offset

    def mark_applied(self, partition: int, offset: int) -> None:
        self.partition, self.offset = partition, offset

    def to_bytes(self) -> bytes:
        header = _STATE_HEADER.pack(_STATE_VERSION, self.partition, self.offset)
        return header + self.windows.to_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, expected_interval_seconds: int) -> TokenState:
        if len(data) < _STATE_HEADER.size:
            raise ValueError("truncated token state")
        version, partition, offset = _STATE_HEADER.unpack_from(data)
        if version != _STATE_VERSION:
            raise ValueError(f"unsupported token state version {version}")
        windows = TokenWindows.from_bytes(data[_STATE_HEADER.size :], expected_interval_seconds)
        return cls(windows, partition, offset)


@contextmanager
def _in_event(event: faust.EventT[bytes]) -> Iterator[None]:
    """Make ``event`` the current event of this task while the table is used.

    Faust's stores pick a key's partition (RocksDB: its database) from the task's current event.
    Events of ``stream.noack_take()`` are read by a background task, so the agent's own task
    has none, and the agent processes events of several partitions in one batch anyway.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


class StateTable(faust.Table[bytes, bytes]):
    """A Faust table of raw bytes with an awaited write path (see the module docstring)."""

    def read(self, key: bytes, event: faust.EventT[bytes]) -> bytes | None:
        """The stored value of ``key`` (held in ``event``'s partition), or None."""
        with _in_event(event):
            value: bytes | None = self.data.get(key)
        return value

    def store(self, key: bytes, value: bytes, event: faust.EventT[bytes]) -> Record:
        """Store ``value`` locally; returns its changelog record (``event``'s partition).

        The caller publishes the record and hands the acknowledgements to :meth:`persisted`.
        """
        with _in_event(event):
            self.data[key] = value
        return (self.changelog_topic.get_topic_name(), key, value, event.message.partition)

    def persisted(self, written: Iterable[Written]) -> None:
        """Note changelog records the broker acknowledged (RocksDB resumes recovery there)."""
        for batch in written:
            # What Faust's own changelog callback records, once per acknowledged batch.
            self.data.set_persisted_offset(batch.tp, batch.last_offset)
