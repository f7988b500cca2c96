"""The done criterion: every recorded entry of the replayed slice on cmc.quotes.raw exactly
once, through injected faults, in v3 and in v1 mode, paging across several pages.

``TOKVEL_WEEK_SNAPSHOTS`` sets how many snapshots are replayed (default 12; ``all`` for the whole
week: the long run documented in services/ingestor/README.md). The test prints the rate.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.integration.ingestor.conftest import (
    assert_exactly_once,
    expected_keys,
    ingestor_settings,
    raw_topic,
    read_topic,
    recorded_snapshots,
    replay_server,
    running_ingestor,
)
from tokvel_common.settings import CommonSettings

pytestmark = pytest.mark.integration

_SNAPSHOTS = os.environ.get("TOKVEL_WEEK_SNAPSHOTS", "12")
SNAPSHOTS = None if _SNAPSHOTS == "all" else int(_SNAPSHOTS)
# Spread over the run: one of each recoverable fault, some of them again now and then.
FAULTS = (
    "minute_rate_limit:after=3",
    "server_error:after=5,count=2,every=97",
    "slow:delay=2,after=9,every=131",  # longer than the 1 s request timeout
    "malformed:after=14,every=173",
    "bad_envelope:after=17",
    "unavailable:after=21",
    "ip_rate_limit:after=26",
    "error:http=200,code=500,after=30",
)


@pytest.mark.parametrize(("version", "page_limit"), [("v3", 60), ("v1", 100)])
async def test_every_recorded_entry_exactly_once_through_faults(
    settings: CommonSettings,
    topic_prefix: str,
    redis_url: str,
    recording: Path,
    version: str,
    page_limit: int,
) -> None:
    snapshots = recorded_snapshots(recording, SNAPSHOTS)
    expected = expected_keys(snapshots)
    async with replay_server(recording, snapshots=SNAPSHOTS, faults=FAULTS) as server:
        config = ingestor_settings(
            settings, topic_prefix, redis_url, server.url,
            cmc_api_version=version, cmc_page_limit=page_limit, poll_interval_seconds=0.01,
        )  # fmt: skip
        started = time.monotonic()
        async with running_ingestor(config) as ingestor:
            await server.wait(
                "the ingestor swept every snapshot",
                lambda s: s["exhausted"],
                within=60 + 0.2 * len(snapshots),
            )
            seconds = time.monotonic() - started
        quotes = await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix))
    assert_exactly_once(quotes, expected)
    assert {q.source for q in quotes} == {f"cmc-pro-api:/{version}/cryptocurrency/listings/latest"}
    # Replayed answers carry the snapshot's time, as backfill does: event time throughout.
    assert all(q.listed_at == q.event_time() for q in quotes)
    usd = [q.quote_in("USD") for q in quotes]
    assert all(u is not None for u in usd)
    assert isinstance(quotes[0].quote, list if version == "v3" else dict)
    failures = {
        reason: ingestor.sample("ingestor_poll_failures_total", reason=reason)
        for reason in ("minute_rate_limit", "server_error", "timeout", "malformed_response",
                       "ip_rate_limit")
    }  # fmt: skip
    assert all(count >= 1 for count in failures.values()), failures
    assert ingestor.sample("ingestor_quotes_published_total") == len(expected)
    assert ingestor.sample(
        "ingestor_cmc_credits_used_total", endpoint=f"{version}_cryptocurrency_listings_latest"
    ) >= len(snapshots)
    print(
        f"\n{version}: {len(expected)} quotes of {len(snapshots)} snapshots in {seconds:.1f} s "
        f"= {len(expected) / seconds:,.0f} quotes/s (page limit {page_limit}, faults injected)"
    )
