"""Every CMC error mode against the real replay server: the ingestor recovers by itself from
429/5xx/timeouts/garbage, stops for good on bad keys and plans, pauses on spent credits."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ingestor.timing import next_utc_midnight, next_utc_month
from tests.integration.ingestor.conftest import (
    free_port,
    ingestor_settings,
    raw_topic,
    read_topic,
    replay_server,
    running_ingestor,
    scrape,
    wait_until,
)
from tokvel_common.settings import CommonSettings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("invalid_key", "api_key_invalid"),
        ("missing_key", "api_key_missing"),
        ("payment_required", "plan_requires_payment"),
        ("payment_expired", "plan_payment_expired"),
        ("key_required", "api_key_required"),
        ("plan_not_authorized", "plan_not_authorized"),
        ("key_disabled", "api_key_disabled"),
        ("bad_request", "bad_request"),
        ("error:http=200,code=1001", "api_key_invalid"),  # a 200 that says the key is bad
    ],
)
async def test_bad_keys_and_plans_stop_polling_loudly(
    settings: CommonSettings,
    topic_prefix: str,
    redis_url: str,
    recording: Path,
    fault: str,
    reason: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with replay_server(recording, snapshots=2, faults=(fault,)) as server:
        config = ingestor_settings(settings, topic_prefix, redis_url, server.url)
        async with running_ingestor(config) as ingestor:
            await wait_until(
                "polling stopped",
                lambda: ingestor.sample("ingestor_polling_stopped", reason=reason) == 1,
            )
            requests = (await server.state())["requests"]
            await asyncio.sleep(1.0)  # five poll intervals: nothing more is asked of CMC
            assert (await server.state())["requests"] == requests == 1
            assert not ingestor.task.done()  # still up: /metrics and /readyz say why
            assert ingestor.sample("ingestor_lease_held") == 0  # handed over
    assert any(r.levelname == "CRITICAL" and "polling stopped" in r.message for r in caplog.records)


async def test_a_wrong_api_key_stops_polling_and_the_ops_endpoints_say_so(
    settings: CommonSettings, topic_prefix: str, redis_url: str, recording: Path
) -> None:
    ops = free_port()
    async with replay_server(recording, snapshots=1) as server:
        config = ingestor_settings(
            settings, topic_prefix, redis_url, server.url,
            cmc_api_key="not-the-key", ingestor_ops_port=ops,
        )  # fmt: skip
        async with running_ingestor(config) as ingestor:
            await wait_until(
                "polling stopped",
                lambda: ingestor.sample("ingestor_polling_stopped", reason="api_key_invalid") == 1,
            )
            base = f"http://127.0.0.1:{ops}"
            async with server.session.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with server.session.get(f"{base}/readyz") as response:
                assert response.status == 503
                body = await response.json()
                assert body["checks"] == {"redis": True, "kafka": True, "polling": False}
            metrics = await scrape(server.session, ops)
            assert metrics["ingestor_polling_stopped{reason=api_key_invalid}"] == 1
            assert metrics["ingestor_poll_failures_total{reason=api_key_invalid}"] == 1
            assert metrics["ingestor_polls_total{outcome=failed}"] == 1
            assert "ingestor_last_successful_poll_timestamp_seconds" in metrics
    assert await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix)) == []


@pytest.mark.parametrize(
    ("fault", "reset"),
    [("daily_credits", next_utc_midnight), ("monthly_credits", next_utc_month)],
)
async def test_spent_credits_pause_polling_until_the_reset(
    settings: CommonSettings,
    topic_prefix: str,
    redis_url: str,
    recording: Path,
    fault: str,
    reset: object,
) -> None:
    async with replay_server(recording, snapshots=1, faults=(fault,)) as server:
        config = ingestor_settings(settings, topic_prefix, redis_url, server.url)
        async with running_ingestor(config) as ingestor:
            await wait_until(
                "polling paused",
                lambda: ingestor.sample("ingestor_paused_until_timestamp_seconds") > 0,
            )
            await asyncio.sleep(1.0)
            assert (await server.state())["requests"] == 1
            paused_until = ingestor.sample("ingestor_paused_until_timestamp_seconds")
            assert ingestor.sample("ingestor_polling_stopped", reason=fault) == 0
    assert callable(reset)
    expected = reset(datetime.now(UTC))
    assert paused_until == expected.timestamp()


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("server_error:count=3", "server_error"),
        ("unavailable:count=2", "server_error"),
        ("slow:delay=2,count=2", "timeout"),
        ("malformed:count=2", "malformed_response"),
        ("bad_envelope", "malformed_response"),
        ("error:http=200,code=500", "server_error"),
        ("minute_rate_limit", "minute_rate_limit"),
        ("ip_rate_limit", "ip_rate_limit"),
    ],
)
async def test_the_ingestor_recovers_by_itself_from_transient_errors(
    settings: CommonSettings,
    topic_prefix: str,
    redis_url: str,
    recording: Path,
    fault: str,
    reason: str,
) -> None:
    async with replay_server(recording, snapshots=1, faults=(fault,)) as server:
        config = ingestor_settings(settings, topic_prefix, redis_url, server.url)
        async with running_ingestor(config) as ingestor:
            await server.wait("a sweep got through", lambda s: s["sweeps"] >= 1)
            await wait_until(
                "the poll completed",
                lambda: ingestor.sample("ingestor_last_successful_poll_timestamp_seconds") > 0,
            )
            assert ingestor.sample("ingestor_poll_failures_total", reason=reason) >= 1
            assert ingestor.sample("ingestor_polling_stopped", reason=reason) == 0
    quotes = await read_topic(settings.kafka_bootstrap_servers, raw_topic(topic_prefix))
    assert len(quotes) == len({q.id for q in quotes}) > 190


async def test_a_minute_limit_waits_for_the_next_window(
    settings: CommonSettings, topic_prefix: str, redis_url: str, recording: Path
) -> None:
    """With a 2 s window standing in for CMC's minute, the retry comes at the window's start."""
    async with replay_server(recording, snapshots=1, faults=("minute_rate_limit",)) as server:
        config = ingestor_settings(
            settings, topic_prefix, redis_url, server.url, cmc_rate_limit_window_seconds=2.0
        )
        async with running_ingestor(config) as ingestor:
            await wait_until(
                "the 429 was seen",
                lambda: (
                    ingestor.sample("ingestor_poll_failures_total", reason="minute_rate_limit") == 1
                ),
            )
            limited_at = datetime.now(UTC).timestamp()
            await server.wait("the retry got through", lambda s: s["sweeps"] >= 1)
            retried_at = datetime.now(UTC).timestamp()
    window_start = (limited_at // 2 + 1) * 2
    assert retried_at >= window_start - 0.05
    assert retried_at - limited_at <= 2.5
