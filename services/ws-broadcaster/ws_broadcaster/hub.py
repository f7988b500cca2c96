"""Who is subscribed to what on this instance, and the fan-out of one update to them.

Pure: subscribers are anything with a non-blocking ``offer(item) -> bool`` (the connections in
production, lists in tests). An update is encoded once, by the caller, with its WebSocket frame,
and the same :class:`Outgoing` (same bytes) is offered to every subscriber; the hub never
serializes. A subscriber whose queue is full (``offer`` returns False) is returned to the
caller, which closes it: it never slows down the others (nothing here waits). It stays attached
until its owner detaches it (which needs its tokens, to clean the Redis registry); a closing
subscriber's ``offer`` accepts and discards, so it is reported once.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, Protocol, TypeVar

MessageKind = Literal["update", "replay", "snapshot", "reply"]

_FIN_TEXT: Final = 0x81  # final fragment, opcode 1 (text), no RSV bits (no compression)


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", _FIN_TEXT, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", _FIN_TEXT, 126, size)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, size)
    return header + payload


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One frame to send. ``produced_at`` (epoch seconds, the Kafka record's timestamp) is set
    for live updates only: it is where the delivery latency is measured from. ``wire`` is the
    whole frame, built once here for every socket it is written to."""

    frame: bytes
    kind: MessageKind
    produced_at: float | None = None
    wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "wire", text_frame(self.frame))


class Subscriber(Protocol):
    def offer(self, item: Outgoing) -> bool:
        """Queue ``item`` without blocking; False when the queue is full."""
        ...


S = TypeVar("S", bound=Subscriber)

_NO_SKIP = -1


class Hub(Generic[S]):
    def __init__(self) -> None:
        # token -> subscriber -> seq up to which updates are skipped (a client that resumed
        # from a seq this instance has not read yet already has those); -1 skips nothing.
        self._tokens: dict[int, dict[S, int]] = {}
        self._subscribers: dict[S, set[int]] = {}
        self._subscriptions = 0

    # -------------------------------------------------------------------- membership

    def attach(self, subscriber: S) -> None:
        self._subscribers.setdefault(subscriber, set())

    def detach(self, subscriber: S) -> set[int]:
        """Forget the subscriber; returns the tokens it was subscribed to."""
        tokens = self._subscribers.pop(subscriber, set())
        for token_id in tokens:
            self._remove(token_id, subscriber)
        return tokens

    def is_attached(self, subscriber: S) -> bool:
        return subscriber in self._subscribers

    def subscribe(self, subscriber: S, token_id: int, *, skip_through: int | None = None) -> bool:
        """True when newly subscribed; False when it already was (or is detached)."""
        tokens = self._subscribers.get(subscriber)
        if tokens is None or token_id in tokens:
            return False
        tokens.add(token_id)
        self._tokens.setdefault(token_id, {})[subscriber] = (
            _NO_SKIP if skip_through is None else skip_through
        )
        self._subscriptions += 1
        return True

    def unsubscribe(self, subscriber: S, token_id: int) -> bool:
        tokens = self._subscribers.get(subscriber)
        if tokens is None or token_id not in tokens:
            return False
        tokens.discard(token_id)
        self._remove(token_id, subscriber)
        return True

    def _remove(self, token_id: int, subscriber: S) -> None:
        subscribers = self._tokens.get(token_id)
        if subscribers is None or subscribers.pop(subscriber, None) is None:
            return
        self._subscriptions -= 1
        if not subscribers:
            del self._tokens[token_id]

    def tokens_of(self, subscriber: S) -> frozenset[int]:
        return frozenset(self._subscribers.get(subscriber, ()))

    def subscription_count_of(self, subscriber: S) -> int:
        return len(self._subscribers.get(subscriber, ()))

    # ----------------------------------------------------------------------- fan-out

    def publish(self, token_id: int, seq: int, item: Outgoing) -> list[S]:
        """Offer ``item`` to the token's subscribers; returns those whose queue was full."""
        subscribers = self._tokens.get(token_id)
        if not subscribers:
            return []
        full: list[S] = []
        for subscriber, skip_through in subscribers.items():
            if seq > skip_through and not subscriber.offer(item):
                full.append(subscriber)
        return full

    # -------------------------------------------------------------------------- counts

    @property
    def connection_count(self) -> int:
        return len(self._subscribers)

    @property
    def subscription_count(self) -> int:
        return self._subscriptions

    @property
    def token_count(self) -> int:
        return len(self._tokens)

    def subscriber_count(self, token_id: int) -> int:
        return len(self._tokens.get(token_id, ()))

    def subscribers(self) -> list[S]:
        return list(self._subscribers)

    def entries(self) -> dict[int, list[S]]:
        """token -> subscribers (a copy), for reconciling the Redis registry."""
        return {token_id: list(subs) for token_id, subs in self._tokens.items()}
