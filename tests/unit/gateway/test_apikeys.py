"""Key format, checksum, peppered hashing, tiers and counter keys (libs/common apikeys)."""

from __future__ import annotations

import re

import pytest
from pydantic import SecretStr, ValidationError

from tokvel_common.apikeys import (
    DEFAULT_TIERS,
    KEY_LENGTH,
    ApiKeySettings,
    TierLimits,
    display_prefix,
    generate_key,
    hash_key,
    hashes_match,
    is_well_formed,
    live_rate_limit_keys,
    rate_limit_key,
    rate_limit_window,
)


def test_generated_keys_have_the_documented_shape() -> None:
    keys = {generate_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert len(key) == KEY_LENGTH == 43
        assert re.fullmatch(r"tvk_[0-9A-Za-z]{39}", key)
        assert is_well_formed(key)
        assert display_prefix(key) == key[:12]


def test_the_checksum_catches_any_single_change() -> None:
    key = generate_key()
    for position in range(4, KEY_LENGTH):
        replacement = "A" if key[position] != "A" else "B"
        assert not is_well_formed(key[:position] + replacement + key[position + 1 :])
    for bad in ("", "tvk_", key[:-1], key + "A", "TVK_" + key[4:], key.replace("tvk_", "abc_")):
        assert not is_well_formed(bad)


def test_hash_depends_on_the_pepper_and_compares_in_constant_time() -> None:
    key = generate_key()
    one, two = SecretStr("pepper-one"), SecretStr("pepper-two")
    assert hash_key(key, one) == hash_key(key, one)
    assert hash_key(key, one) != hash_key(key, two)
    assert len(hash_key(key, one)) == 64 and key not in hash_key(key, one)
    assert hashes_match(hash_key(key, one), hash_key(key, one))
    assert not hashes_match(hash_key(key, one), hash_key(key, two))


def test_tiers_default_to_the_architecture_and_are_configurable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = ApiKeySettings()
    assert settings.api_tiers["basic"] == TierLimits(per_minute=60, per_month=1000)
    assert settings.api_tiers == DEFAULT_TIERS
    assert settings.uses_dev_pepper
    monkeypatch.setenv("API_TIERS", '{"basic": {"per_minute": 10, "per_month": 20}}')
    monkeypatch.setenv("API_KEY_PEPPER", "s3cret")
    custom = ApiKeySettings()
    assert custom.tier_limits("basic").per_minute == 10
    assert custom.tier_limits("unknown") == custom.tier_limits("basic")
    assert not custom.uses_dev_pepper
    monkeypatch.setenv("API_DEFAULT_TIER", "gold")
    with pytest.raises(ValidationError):
        ApiKeySettings()


def test_key_cache_ttl_cannot_exceed_the_propagation_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("API_KEY_CACHE_TTL_SECONDS", "6")
    with pytest.raises(ValidationError):
        ApiKeySettings()


def test_rate_limit_keys_cover_every_live_window() -> None:
    now = 1_700_000_030.0
    window = rate_limit_window(now)
    assert window == 28_333_333
    assert rate_limit_key("ab", window) == "rate_limit:ab:28333333"
    keys = live_rate_limit_keys("ab", now)
    assert keys[0] == rate_limit_key("ab", window - 60)
    assert rate_limit_key("ab", window) in keys and rate_limit_key("ab", window + 1) in keys
