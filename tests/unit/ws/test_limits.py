"""Rate limiting and settings rules of the broadcaster (no I/O)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ws_broadcaster.ratelimit import MessageLimiter, TokenBucket
from ws_broadcaster.settings import DEFAULT_WS_TIERS, WsSettings


def test_bucket_allows_burst_then_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5)  # one token back after half a second at 2/s
    assert not bucket.take(0.5)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_strikes_count_consecutive_refusals() -> None:
    limiter = MessageLimiter(rate=1.0, burst=1, max_strikes=3, now=0.0)
    assert limiter.check(0.0)
    assert not limiter.check(0.0)
    assert not limiter.check(0.0)
    assert not limiter.exhausted
    assert limiter.check(1.5)  # an accepted message clears the strikes
    assert limiter.strikes == 0
    for _ in range(3):
        limiter.check(1.5)
    assert limiter.exhausted


def test_origins() -> None:
    settings = WsSettings(ws_allowed_origins=["https://App.example.com/"])
    assert settings.origin_allowed(None)  # not a browser
    assert settings.origin_allowed("https://app.example.com")
    assert not settings.origin_allowed("https://evil.example.com")
    assert not settings.origin_allowed("null")
    assert WsSettings(ws_allowed_origins=["*"]).origin_allowed("https://anything.test")
    assert not WsSettings().origin_allowed("http://localhost:3000")


def test_tiers() -> None:
    settings = WsSettings()
    assert settings.ws_limits("pro") == DEFAULT_WS_TIERS["pro"]
    assert settings.ws_limits("no-such-tier") == DEFAULT_WS_TIERS["basic"]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WS_PORT", "9001")
    monkeypatch.setenv("WS_ALLOWED_ORIGINS", '["https://a.test"]')
    monkeypatch.setenv(
        "WS_TIERS",
        '{"basic": {"max_subscriptions": 2, "max_connections": 1, '
        '"messages_per_second": 1, "burst": 1}}',
    )
    settings = WsSettings()
    assert settings.ws_port == 9001
    assert settings.ws_allowed_origins == ["https://a.test"]
    assert settings.ws_limits("basic").max_subscriptions == 2


def test_invalid_settings() -> None:
    with pytest.raises(ValidationError):
        WsSettings(ws_instance_id="has:colon")
    with pytest.raises(ValidationError):
        WsSettings(ws_instance_ttl_seconds=1, ws_instance_heartbeat_seconds=2)
    with pytest.raises(ValidationError):
        WsSettings(ws_tiers={"pro": DEFAULT_WS_TIERS["pro"]})  # no limits for the default tier
    assert WsSettings().ws_instance_id != WsSettings().ws_instance_id
