"""Fault injection of the replay server: which answer to spoil, and how.

A fault is written ``KIND[:option=value,...]`` (the ``--fault`` flag, ``REPLAY_FAULTS`` and the
admin endpoint all take this form)::

    minute_rate_limit                     the next CMC request gets 429 with error_code 1008
    server_error:count=2,after=3          requests 4 and 5 get a 500
    slow:delay=5,path=/v3                 the next /v3 request answers after 5 s
    error:http=200,code=1009              a 200 whose envelope says 1009
    malformed:every=10                    a truncated body now and every 10 requests after

Options: ``count`` (consecutive requests spoiled, default 1), ``after`` (requests let through
first, default 0), ``every`` (after firing, let that many through and fire again; default: fire
once), ``path`` (only requests whose path starts with it), ``delay`` (seconds, ``slow`` only),
``http`` and ``code`` (``error`` only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# CMC's documented messages for its own error codes.
CMC_MESSAGES: Mapping[int, str] = {
    400: "Bad Request",
    500: "An internal server error occurred.",
    1001: "This API Key is invalid.",
    1002: "API key missing.",
    1003: "Your API Key must be activated. Please go to pro.coinmarketcap.com/account/plan.",
    1004: "Your API Key's subscription plan has expired.",
    1005: "An API Key is required for this call.",
    1006: "Your API Key subscription plan doesn't support this endpoint.",
    1007: "This API Key has been disabled. Please contact support.",
    1008: "You've exceeded your API Key's HTTP request rate limit. Rate limits reset every minute.",
    1009: "You've exceeded your API Key's daily rate limit.",
    1010: "You've exceeded your API Key's monthly rate limit.",
    1011: "You've hit an IP rate limit.",
}

# Named faults that answer like CMC's own errors: (HTTP status, status.error_code).
NAMED_ERRORS: Mapping[str, tuple[int, int]] = {
    "bad_request": (400, 400),
    "invalid_key": (401, 1001),
    "missing_key": (401, 1002),
    "payment_required": (402, 1003),
    "payment_expired": (402, 1004),
    "key_required": (403, 1005),
    "plan_not_authorized": (403, 1006),
    "key_disabled": (403, 1007),
    "minute_rate_limit": (429, 1008),
    "daily_credits": (429, 1009),
    "monthly_credits": (429, 1010),
    "ip_rate_limit": (429, 1011),
    "server_error": (500, 500),
}
# Faults that are not a CMC error answer.
OTHER_KINDS = (
    "error",  # any HTTP status and error_code (http=..., code=...)
    "unavailable",  # 503 with an HTML page, as a load balancer answers
    "slow",  # the right answer, late
    "malformed",  # 200 with a truncated JSON body
    "bad_envelope",  # 200 with JSON that is no CMC envelope
)
KINDS = tuple(NAMED_ERRORS) + OTHER_KINDS


class FaultSpecError(ValueError):
    pass


@dataclass
class Fault:
    kind: str
    count: int = 1
    after: int = 0
    every: int = 0
    path: str = ""
    delay: float = 5.0
    http: int = 500
    code: int = 500
    remaining: int = 0  # requests still to spoil in the current burst

    def __post_init__(self) -> None:
        if self.kind in NAMED_ERRORS:
            self.http, self.code = NAMED_ERRORS[self.kind]
        self.remaining = self.count

    def describe(self) -> dict[str, object]:
        return {
            "kind": self.kind, "remaining": self.remaining, "after": self.after,
            "every": self.every, "path": self.path,
        }  # fmt: skip


_OPTION_TYPES: Mapping[str, type[int] | type[float] | type[str]] = {
    "count": int, "after": int, "every": int, "http": int, "code": int,
    "delay": float, "path": str,
}  # fmt: skip


def parse_fault(spec: str) -> Fault:
    kind, _, options = spec.strip().partition(":")
    if kind not in KINDS:
        raise FaultSpecError(f"unknown fault {kind!r}; known: {', '.join(KINDS)}")
    values: dict[str, int | float | str] = {}
    for option in filter(None, (o.strip() for o in options.split(","))):
        name, sep, text = option.partition("=")
        if not sep or name not in _OPTION_TYPES:
            known = ", ".join(_OPTION_TYPES)
            raise FaultSpecError(f"fault option {option!r} is not name=value with name in {known}")
        try:
            values[name] = _OPTION_TYPES[name](text)
        except ValueError as exc:
            raise FaultSpecError(f"bad value in fault option {option!r}") from exc
    fault = Fault(kind, **values)  # type: ignore[arg-type] # each value has its option's type
    if fault.count < 1 or fault.after < 0 or fault.every < 0 or fault.delay < 0:
        raise FaultSpecError(f"fault options out of range in {spec!r}")
    return fault


class FaultPlan:
    """The armed faults; each request asks :meth:`next_for` which one (if any) spoils it."""

    def __init__(self) -> None:
        self.faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self.faults.append(fault)

    def clear(self) -> None:
        self.faults.clear()

    def next_for(self, path: str) -> Fault | None:
        """The fault that spoils this request; every matching fault counts the request."""
        chosen: Fault | None = None
        for fault in self.faults:
            if not path.startswith(fault.path):
                continue
            if fault.after > 0:
                fault.after -= 1
            elif chosen is None:
                chosen = fault
                fault.remaining -= 1
                if fault.remaining == 0 and fault.every:
                    fault.after, fault.remaining = fault.every, fault.count
        self.faults = [f for f in self.faults if f.remaining > 0]
        return chosen
