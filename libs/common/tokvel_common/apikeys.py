"""API keys: format, generation, checksum, peppered hashing, tiers, lookup SQL, change propagation.

Shared by every service that authenticates clients (the REST gateway, the WebSocket broadcaster)
and by ``tokvel keys``, so a key minted by one is understood by all.

Key format
    ``tvk_`` + 33 base62 characters encoding 192 random bits (``secrets``) + 6 base62 characters
    of CRC-32 over the first 37 characters: 43 characters, ``[0-9A-Za-z_]``, double-click
    selectable. The checksum lets a service reject a mistyped or made-up key without a database
    lookup (GitHub's token format does the same); it is no secret and adds no security.
    ``key_prefix`` (stored, shown in listings and logs) is the first 12 characters: enough to tell
    keys apart, far too few (47 bits) to guess the remaining 145 random bits.

Storage
    Only ``HMAC-SHA-256(pepper, key)`` (hex) is stored, in ``api_keys.key_hash`` (unique, indexed).
    The pepper is a server-side secret (``API_KEY_PEPPER``) that never enters the database, so a
    stolen table alone cannot be used to test guesses. A lookup is by that hash; the match is then
    confirmed with :func:`hmac.compare_digest` so no comparison of secrets depends on timing.
    The plaintext key is shown once, by ``tokvel keys create``/``rotate``, and never logged.

Tiers
    ``API_TIERS`` (JSON) maps a tier name to its per-minute and per-month limits; the defaults are
    ARCHITECTURE.md's (basic 60/min and 1 000/month, pro, enterprise).

Propagation of changes (revoke, rotate, set-tier)
    PostgreSQL is the truth. Whoever changes a key publishes a :class:`KeyChange` on
    :data:`KEY_CHANGES_CHANNEL` and deletes the key's per-minute counters; each service instance
    drops its in-process entry for that key on receipt, and drops every entry whenever its
    subscription is (re)established (messages may have been missed). In-process entries also
    expire after ``API_KEY_CACHE_TTL_SECONDS`` (at most 5), so a change reaches every instance
    within that bound even when Redis, and with it the announcement, is unavailable.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import zlib
from collections.abc import Callable
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from tokvel_common.pubsub import ChannelListener
from tokvel_common.redis_client import RedisClient
from tokvel_common.serialization import encode
from tokvel_common.settings import CommonSettings

# ---------------------------------------------------------------------------------- key format

KEY_PREFIX: Final = "tvk_"
RANDOM_BYTES: Final = 24  # 192 bits
_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_CHARS: Final = 33  # 62**33 > 2**192
_CHECKSUM_CHARS: Final = 6  # 62**6 > 2**32
KEY_LENGTH: Final = len(KEY_PREFIX) + _BODY_CHARS + _CHECKSUM_CHARS
DISPLAY_PREFIX_LENGTH: Final = 12
_KEY_PATTERN: Final = re.compile(rf"^{KEY_PREFIX}[0-9A-Za-z]{{{_BODY_CHARS + _CHECKSUM_CHARS}}}$")


def _base62(value: int, width: int) -> str:
    digits: list[str] = []
    while value:
        value, digit = divmod(value, 62)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits)).rjust(width, _ALPHABET[0])


def _checksum(head: str) -> str:
    return _base62(zlib.crc32(head.encode("ascii")), _CHECKSUM_CHARS)


def generate_key() -> str:
    """A new random key (shown to its owner once, stored only as its hash)."""
    head = KEY_PREFIX + _base62(int.from_bytes(secrets.token_bytes(RANDOM_BYTES), "big"), 33)
    return head + _checksum(head)


def is_well_formed(key: str) -> bool:
    """Shape and checksum are right: worth a lookup. Says nothing about the key existing."""
    if len(key) != KEY_LENGTH or _KEY_PATTERN.match(key) is None:
        return False
    head, checksum = key[:-_CHECKSUM_CHARS], key[-_CHECKSUM_CHARS:]
    return hmac.compare_digest(_checksum(head), checksum)


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LENGTH]


def hash_key(key: str, pepper: SecretStr) -> str:
    """HMAC-SHA-256 of the key under the server-side pepper, hex (what ``key_hash`` holds)."""
    return hmac.new(
        pepper.get_secret_value().encode(), key.encode("utf-8"), hashlib.sha256
    ).hexdigest()


def hashes_match(stored: str, computed: str) -> bool:
    return hmac.compare_digest(stored.encode(), computed.encode())


# ------------------------------------------------------------------------------------ settings

# Marked as what it is: accepted so that a fresh checkout runs, warned about at every start.
DEV_PEPPER: Final = "tokvel-local-dev-pepper-NOT-FOR-PRODUCTION"


class TierLimits(BaseModel):
    model_config = ConfigDict(frozen=True)

    per_minute: int = Field(ge=1, description="Requests per calendar minute (UTC).")
    per_month: int = Field(ge=1, description="Requests per calendar month (UTC).")


DEFAULT_TIERS: Final = {
    "basic": TierLimits(per_minute=60, per_month=1_000),
    "pro": TierLimits(per_minute=600, per_month=100_000),
    "enterprise": TierLimits(per_minute=6_000, per_month=10_000_000),
}


class ApiKeySettings(CommonSettings):
    """What every service that checks API keys (and ``tokvel keys``) must agree on."""

    api_key_pepper: SecretStr = Field(
        default=SecretStr(DEV_PEPPER),
        description=(
            "Server-side secret of the key hashes (HMAC-SHA-256). The default is for local "
            "development only and is warned about at start; set a long random value elsewhere. "
            "Changing it invalidates every key."
        ),
    )
    api_tiers: dict[str, TierLimits] = Field(
        default_factory=lambda: dict(DEFAULT_TIERS),
        description='JSON: {"tier": {"per_minute": n, "per_month": n}, ...}.',
    )
    api_default_tier: str = Field(
        default="basic",
        description="Tier of new keys, and the limits applied to a key whose tier is unknown.",
    )
    api_key_cache_ttl_seconds: float = Field(
        default=2.0,
        gt=0,
        le=5,
        description="How long an instance trusts its in-process copy of a key (bounds "
        "how long a revocation or tier change takes when its announcement is lost).",
    )

    @model_validator(mode="after")
    def _default_tier_exists(self) -> ApiKeySettings:
        if self.api_default_tier not in self.api_tiers:
            raise ValueError(f"API_DEFAULT_TIER {self.api_default_tier!r} is not in API_TIERS")
        return self

    @property
    def uses_dev_pepper(self) -> bool:
        return self.api_key_pepper.get_secret_value() == DEV_PEPPER

    def tier_limits(self, tier: str) -> TierLimits:
        return self.api_tiers.get(tier) or self.api_tiers[self.api_default_tier]


# ------------------------------------------------------------------------------------------ SQL

# The lookup every authenticating service runs: the key and its usage in the current month
# ($2 = first day of the month, UTC). Index scans on api_keys.key_hash and the unique
# (api_key_id, period_start) of rate_limiting.
SELECT_KEY_BY_HASH: Final = """
SELECT k.id, k.key_hash, k.key_prefix, k.name, k.tier, k.is_active,
       COALESCE(r.usage_count, 0) AS month_usage
FROM api_keys k
LEFT JOIN rate_limiting r ON r.api_key_id = k.id AND r.period_start = $2
WHERE k.key_hash = $1
"""

INSERT_KEY: Final = """
INSERT INTO api_keys (key_hash, key_prefix, name, tier)
VALUES ($1, $2, $3, $4)
RETURNING id, key_prefix, name, tier, is_active, created_at
"""

SELECT_KEYS: Final = """
SELECT k.id, k.key_prefix, k.name, k.tier, k.is_active, k.created_at, k.revoked_at,
       k.last_used_at, COALESCE(r.usage_count, 0) AS month_usage
FROM api_keys k
LEFT JOIN rate_limiting r ON r.api_key_id = k.id AND r.period_start = $1
WHERE k.is_active OR $2
ORDER BY k.id
"""

# A key is named by its id or its display prefix; FOR UPDATE keeps a concurrent change out.
SELECT_KEY_FOR_UPDATE: Final = """
SELECT id, key_hash, key_prefix, name, tier, is_active
FROM api_keys
WHERE id = $1 OR key_prefix = $2
FOR UPDATE
"""

REVOKE_KEY: Final = """
UPDATE api_keys SET is_active = false, revoked_at = now()
WHERE id = $1
"""

ROTATE_KEY: Final = """
UPDATE api_keys SET key_hash = $2, key_prefix = $3
WHERE id = $1
"""

SET_KEY_TIER: Final = """
UPDATE api_keys SET tier = $2
WHERE id = $1
"""


# ---------------------------------------------------------------------------- rate limit keys

RATE_LIMIT_WINDOW_SECONDS: Final = 60
RATE_LIMIT_TTL_SECONDS: Final = 3600  # ARCHITECTURE.md: rate_limit:{api_key_hash}:{window}


def rate_limit_window(epoch_seconds: float) -> int:
    """The number of the calendar minute (UTC) a request at ``epoch_seconds`` counts in."""
    return int(epoch_seconds) // RATE_LIMIT_WINDOW_SECONDS


def rate_limit_key(key_hash: str, window: int) -> str:
    return f"rate_limit:{key_hash}:{window}"


def live_rate_limit_keys(key_hash: str, epoch_seconds: float) -> list[str]:
    """Every counter of this key that may still exist (their TTL is an hour), without SCAN."""
    current = rate_limit_window(epoch_seconds)
    windows = RATE_LIMIT_TTL_SECONDS // RATE_LIMIT_WINDOW_SECONDS
    return [rate_limit_key(key_hash, w) for w in range(current - windows, current + 2)]


# ------------------------------------------------------------------------ change propagation

KEY_CHANGES_CHANNEL: Final = "tokvel:apikeys"

KeyAction = Literal["revoked", "rotated", "tier_changed", "created"]


class KeyChange(BaseModel):
    """A key's row changed: instances drop what they hold for ``key_hash``."""

    model_config = ConfigDict(frozen=True)

    key_hash: str
    action: KeyAction


async def announce_key_change(client: RedisClient, key_hash: str, action: KeyAction) -> None:
    """Drop the key's per-minute counters and tell every instance; raises RedisError."""
    pipe = client.pipeline(transaction=False)
    for key in live_rate_limit_keys(key_hash, time.time()):
        pipe.unlink(key)
    await pipe.execute()
    await client.publish(KEY_CHANGES_CHANNEL, encode(KeyChange(key_hash=key_hash, action=action)))


class KeyChangeListener(ChannelListener[KeyChange]):
    """Calls ``on_change`` for each announced change and ``on_reset`` on every (re)subscription.

    ``on_reset`` drops every cached key: changes may have been missed meanwhile (see
    :mod:`tokvel_common.pubsub`). On a Redis Cluster classic pub/sub is broadcast to every node,
    so subscribing through the configured node suffices.
    """

    def __init__(
        self,
        url: str,
        on_change: Callable[[KeyChange], None],
        on_reset: Callable[[], None],
        *,
        retry_seconds: float = 1.0,
    ) -> None:
        super().__init__(
            KEY_CHANGES_CHANNEL, KeyChange, on_change, on_reset, retry_seconds=retry_seconds
        )
        self._url = url

    def subscriber_urls(self) -> list[str]:
        return [self._url]
