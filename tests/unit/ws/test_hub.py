"""Subscriptions and fan-out, with list-backed subscribers (no I/O); the prebuilt frame."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import WSMsgType
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_websocket import WebSocketWriter

from ws_broadcaster.hub import Hub, Outgoing, text_frame


class Fake:
    def __init__(self, capacity: int = 100) -> None:
        self.items: list[Outgoing] = []
        self.capacity = capacity

    def offer(self, item: Outgoing) -> bool:
        if len(self.items) >= self.capacity:
            return False
        self.items.append(item)
        return True


def _item(n: int) -> Outgoing:
    return Outgoing(f"frame-{n}".encode(), "update", 1.0)


def test_updates_reach_exactly_the_subscribers_of_their_token() -> None:
    hub: Hub[Fake] = Hub()
    a, b, c = Fake(), Fake(), Fake()
    for s in (a, b, c):
        hub.attach(s)
    assert hub.subscribe(a, 1)
    assert hub.subscribe(b, 1)
    assert hub.subscribe(b, 2)
    assert not hub.subscribe(b, 2)  # already
    assert hub.publish(1, 10, _item(1)) == []
    assert hub.publish(2, 11, _item(2)) == []
    assert hub.publish(3, 12, _item(3)) == []
    assert [i.frame for i in a.items] == [b"frame-1"]
    assert [i.frame for i in b.items] == [b"frame-1", b"frame-2"]
    assert c.items == []
    assert (hub.connection_count, hub.subscription_count, hub.token_count) == (3, 3, 2)


def test_the_same_bytes_go_to_every_subscriber() -> None:
    hub: Hub[Fake] = Hub()
    subscribers = [Fake() for _ in range(50)]
    for s in subscribers:
        hub.attach(s)
        hub.subscribe(s, 7)
    item = _item(0)
    hub.publish(7, 1, item)
    assert all(s.items[0] is item for s in subscribers)


def test_unsubscribe_and_detach() -> None:
    hub: Hub[Fake] = Hub()
    a = Fake()
    hub.attach(a)
    hub.subscribe(a, 1)
    hub.subscribe(a, 2)
    assert hub.unsubscribe(a, 1)
    assert not hub.unsubscribe(a, 1)
    hub.publish(1, 1, _item(1))
    assert a.items == []
    assert hub.tokens_of(a) == {2}
    assert hub.detach(a) == {2}
    assert (hub.connection_count, hub.subscription_count, hub.token_count) == (0, 0, 0)
    assert not hub.subscribe(a, 3)  # detached subscribers cannot subscribe


def test_a_full_subscriber_is_reported_and_the_others_still_get_it() -> None:
    hub: Hub[Fake] = Hub()
    slow, fast = Fake(capacity=2), Fake()
    for s in (slow, fast):
        hub.attach(s)
        hub.subscribe(s, 1)
    reported = [hub.publish(1, n, _item(n)) for n in range(5)]
    assert reported == [[], [], [slow], [slow], [slow]]
    assert len(fast.items) == 5
    assert len(slow.items) == 2


def test_resumed_subscription_skips_what_the_client_has() -> None:
    hub: Hub[Fake] = Hub()
    a = Fake()
    hub.attach(a)
    hub.subscribe(a, 1, skip_through=20)
    for seq in (19, 20, 21):
        hub.publish(1, seq, _item(seq))
    assert [i.frame for i in a.items] == [b"frame-21"]


def test_entries_for_the_registry() -> None:
    hub: Hub[Fake] = Hub()
    a, b = Fake(), Fake()
    for s in (a, b):
        hub.attach(s)
    hub.subscribe(a, 1)
    hub.subscribe(b, 1)
    hub.subscribe(b, 2)
    entries = hub.entries()
    assert set(entries) == {1, 2}
    assert set(map(id, entries[1])) == {id(a), id(b)}


class _CapturingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536, 70_000])
async def test_the_prebuilt_frame_is_the_one_aiohttp_would_send(size: int) -> None:
    """The fan-out writes ``Outgoing.wire`` to the transport itself, the sender task goes
    through aiohttp: the bytes on the wire must be the same (each length encoding)."""
    transport = _CapturingTransport()
    writer = WebSocketWriter(BaseProtocol(asyncio.get_running_loop()), transport)
    payload = (bytes(range(256)) * (size // 256 + 1))[:size]
    await writer.send_frame(payload, WSMsgType.TEXT)
    assert Outgoing(payload, "update").wire == bytes(transport.written)
    assert text_frame(payload) == bytes(transport.written)
