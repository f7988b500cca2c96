"""tokvel_common.keylookup: the key checks and the in-process key cache both services share."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from tokvel_common.apikeys import display_prefix, generate_key, hash_key
from tokvel_common.keylookup import KeyCache, KeyRecord, KeyRejected

PEPPER = SecretStr("unit-test-pepper")


class StoreDown(Exception):
    """What the service's repository raises when PostgreSQL cannot be reached."""


class Store:
    """The key table as the cache's ``fetch`` sees it, with a switch to take it down."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.fetches = 0
        self.down = False
        self.gate = asyncio.Event()
        self.gate.set()

    def add(self, key: str, *, active: bool = True, tier: str = "basic") -> str:
        key_hash = hash_key(key, PEPPER)
        self.records[key_hash] = KeyRecord(
            id=len(self.records) + 1,
            key_hash=key_hash,
            key_prefix=display_prefix(key),
            name="test",
            tier=tier,
            is_active=active,
            month_usage=0,
        )
        return key_hash

    async def fetch(self, key_hash: str) -> KeyRecord | None:
        self.fetches += 1
        await self.gate.wait()
        if self.down:
            raise StoreDown
        return self.records.get(key_hash)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def cache(store: Store, clock: Clock, stale_seconds: float = 0.0) -> KeyCache:
    return KeyCache(
        store.fetch,
        PEPPER,
        ttl_seconds=2.0,
        unavailable=StoreDown,
        stale_seconds=stale_seconds,
        clock=clock,
    )


async def test_missing_malformed_unknown_and_revoked_keys_are_told_apart() -> None:
    store, clock = Store(), Clock()
    keys = cache(store, clock)
    revoked = generate_key()
    store.add(revoked, active=False)
    cases = [
        (None, "missing", None),
        ("", "missing", None),
        (generate_key()[:-1] + "x", "malformed", None),
        (generate_key(), "unknown", "database"),
        (revoked, "revoked", "database"),
    ]
    for raw, problem, source in cases:
        with pytest.raises(KeyRejected) as rejected:
            await keys.verify(raw)
        assert (rejected.value.problem, rejected.value.source) == (problem, source)
    assert store.fetches == 2  # the malformed ones never reached the store


async def test_a_key_is_looked_up_once_per_ttl_and_once_for_concurrent_requests() -> None:
    store, clock = Store(), Clock()
    keys = cache(store, clock)
    key = generate_key()
    key_hash = store.add(key, tier="pro")
    store.gate.clear()
    waiting = [asyncio.create_task(keys.verify(key)) for _ in range(20)]
    await asyncio.sleep(0)
    store.gate.set()
    verified = await asyncio.gather(*waiting)
    assert store.fetches == 1
    assert {(v.key_hash, v.record.tier, v.source) for v in verified} == {
        (key_hash, "pro", "database")
    }
    clock.now += 1.9
    assert (await keys.verify(key)).source == "memory"
    clock.now += 0.1
    assert (await keys.verify(key)).source == "database"
    assert store.fetches == 2


async def test_a_dropped_key_is_read_again_and_never_served_stale() -> None:
    store, clock = Store(), Clock()
    keys = cache(store, clock, stale_seconds=60.0)
    key = generate_key()
    key_hash = store.add(key)
    await keys.verify(key)
    clock.now += 5  # past the TTL, within the stale allowance
    store.down = True
    assert (await keys.verify(key)).source == "stale"
    keys.drop(key_hash)  # revoked, say: announced while PostgreSQL is down
    with pytest.raises(StoreDown):
        await keys.verify(key)
    store.down = False
    assert (await keys.verify(key)).source == "database"
    keys.reset()
    clock.now += 61 + 2
    store.down = True
    with pytest.raises(StoreDown):
        await keys.verify(key)


async def test_without_a_stale_allowance_an_unreachable_store_is_an_error() -> None:
    store, clock = Store(), Clock()
    keys = cache(store, clock)
    key = generate_key()
    store.add(key)
    await keys.verify(key)
    clock.now += 2
    store.down = True
    with pytest.raises(StoreDown):
        await keys.verify(key)


async def test_close_cancels_the_lookups_in_flight() -> None:
    store, clock = Store(), Clock()
    keys = cache(store, clock)
    key = generate_key()
    store.add(key)
    store.gate.clear()
    waiter = asyncio.create_task(keys.verify(key))
    await asyncio.sleep(0)
    await keys.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_key_seen_before_is_still_looked_up_and_can_be_revoked() -> None:
    store, clock = Store(), Clock()
    keys = cache(store, clock)
    key = generate_key()
    key_hash = store.add(key)
    assert (await keys.verify(key)).key_hash == key_hash
    del store.records[key_hash]  # rotated: the old key is gone from the table
    keys.drop(key_hash)
    with pytest.raises(KeyRejected) as rejected:
        await keys.verify(key)
    assert rejected.value.problem == "unknown"
    store.add(key, active=False)
    keys.reset()
    with pytest.raises(KeyRejected) as rejected:
        await keys.verify(key)
    assert rejected.value.problem == "revoked"
