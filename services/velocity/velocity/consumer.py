"""Faust's Kafka consumer, with records fetched across a rebalance or seek discarded.

Why: Faust's fetch loop (``Consumer._drain_messages``) drops every message whose offset is
below the partition's read offset, which it advances as it hands messages on. After a
rebalance, recovery seeks each partition back to its committed offset and resets the read
offsets to match (``perform_seek``). But a fetch that was waiting in the consumer thread
during the rebalance can return afterwards with records from the old positions; Faust checks
the generation only after that fetch returned, so those records pass as current. Handing them
on moves the read offset past everything after the commit, and when the partition is read
again from its committed offset, every message up to there is dropped as "already read". The
messages that were still queued for the agent when the rebalance cleared its buffer are then
never processed. Seen here: a worker keeping partitions through a rebalance, under load,
silently skipped 3 384 messages of one partition (the two-worker replay test stalled).

So a fetch is used only if no rebalance and no seek happened while it was waiting. Otherwise
its records of the input topic are dropped (the changelog's belong to table recovery, which
positions those partitions itself) and the partitions are sought to their committed offsets
again (nothing is read until that seek succeeded): what the dropped records held is read
again, and whatever of it was already applied is recognised by the token state (agents.py)
and skipped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final

from faust.transport.drivers.aiokafka import Consumer, Transport

log = logging.getLogger(__name__)

_SEEK_RETRY_SECONDS: Final = 0.5


class RebalanceSafeConsumer(Consumer):
    """Faust's aiokafka consumer that never hands on records fetched across a seek."""

    _seeks = 0
    _seek_owed = False  # records were dropped and the seek that re-reads them has not succeeded

    async def perform_seek(self) -> None:
        self._seeks += 1
        await super().perform_seek()

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:  # noqa: ASYNC109
        if self._seek_owed and not await self._seek_to_committed():
            return None, None  # nothing is read until the dropped records can be read again
        generation, seeks = self.app.consumer_generation_id, self._seeks
        records, active_partitions = await super()._wait_next_records(timeout)
        if not records or (generation == self.app.consumer_generation_id and seeks == self._seeks):
            return records, active_partitions
        # Changelog records are table recovery's: it positions and tracks those partitions
        # itself, and a seek to the committed offsets does not move them (nothing is committed
        # there), so dropping them would lose them.
        changelogs = self.app.tables.changelog_topics
        kept = {tp: batch for tp, batch in records.items() if tp.topic in changelogs}
        if len(kept) == len(records):
            return records, active_partitions
        log.info(
            "records fetched across a rebalance discarded; reading again from the commit",
            extra={
                "partitions": len(records) - len(kept),
                "records": sum(len(batch) for tp, batch in records.items() if tp not in kept),
            },
        )
        self._seek_owed = True
        await self._seek_to_committed()
        return kept or None, active_partitions

    async def _seek_to_committed(self) -> bool:
        try:
            await self.perform_seek()
        except Exception:
            # E.g. the assignment changed under it; the next fetch tries again.
            log.warning("seek to the committed offsets failed, retrying", exc_info=True)
            await asyncio.sleep(_SEEK_RETRY_SECONDS)
            return False
        self._seek_owed = False
        return True


class RebalanceSafeTransport(Transport):
    """The aiokafka transport with :class:`RebalanceSafeConsumer`."""

    Consumer = RebalanceSafeConsumer
