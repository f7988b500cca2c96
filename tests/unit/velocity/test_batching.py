"""velocity.agents.coalesced: input parts joined into batches by size, age and quiet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from velocity.agents import coalesced


async def from_queue(queue: asyncio.Queue[list[int] | None]) -> AsyncIterator[Sequence[int]]:
    while (part := await queue.get()) is not None:
        yield part


async def test_parts_are_joined_up_to_the_size_and_a_part_is_never_split() -> None:
    queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
    for start in range(0, 30, 3):
        queue.put_nowait(list(range(start, start + 3)))
    queue.put_nowait(None)
    batches = [
        batch async for batch in coalesced(from_queue(queue), max_size=10, within=60, idle=60)
    ]
    assert [len(b) for b in batches] == [9, 9, 9, 3]
    assert [item for batch in batches for item in batch] == list(range(30))


async def test_a_burst_is_yielded_once_the_input_is_quiet_not_when_the_batch_is_old() -> None:
    queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
    queue.put_nowait([1, 2])
    queue.put_nowait([3])
    batches = coalesced(from_queue(queue), max_size=100, within=600, idle=0.05)
    async with asyncio.timeout(30):  # far below `within`: only the quiet closes it
        assert await anext(batches) == [1, 2, 3]
    queue.put_nowait([4])
    queue.put_nowait(None)
    assert [batch async for batch in batches] == [[4]]


async def test_a_steady_flow_is_cut_into_batches_by_age() -> None:
    async def steady() -> AsyncIterator[Sequence[int]]:
        for n in range(400):
            await asyncio.sleep(0.005)
            yield [n]

    batches = [batch async for batch in coalesced(steady(), max_size=10_000, within=0.2, idle=30)]
    # Never quiet and never full: only the age closes a batch (400 parts take >= 2 s).
    assert len(batches) > 2
    assert [item for batch in batches for item in batch] == list(range(400))


async def test_closing_the_batches_cancels_the_pending_read() -> None:
    queue: asyncio.Queue[list[int] | None] = asyncio.Queue()
    queue.put_nowait([1])
    batches = coalesced(from_queue(queue), max_size=100, within=600, idle=0.05)
    assert await anext(batches) == [1]
    reading = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.1)  # waiting for a part that never comes
    reading.cancel()
    await asyncio.wait([reading])
    await batches.aclose()
    assert all(task.done() for task in asyncio.all_tasks() if task is not asyncio.current_task())
