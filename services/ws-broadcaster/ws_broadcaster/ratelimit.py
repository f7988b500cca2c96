"""Per-connection message rate limit: a token bucket, plus strikes for clients that ignore it.

Pure: the caller passes the (monotonic) time.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` messages per second on average, ``burst`` at once."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class MessageLimiter:
    """A bucket, and how many messages in a row it refused: past ``max_strikes`` the client
    is not merely bursty but ignoring the ``rate_limited`` errors, and gets disconnected."""

    __slots__ = ("_bucket", "_max_strikes", "strikes")

    def __init__(self, rate: float, burst: int, max_strikes: int, now: float) -> None:
        self._bucket = TokenBucket(rate, burst, now)
        self._max_strikes = max_strikes
        self.strikes = 0

    def check(self, now: float) -> bool:
        """True: handle the message. False: refuse it (see :attr:`exhausted`)."""
        if self._bucket.take(now):
            self.strikes = 0
            return True
        self.strikes += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.strikes >= self._max_strikes
