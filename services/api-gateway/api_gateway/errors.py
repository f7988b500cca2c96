"""Errors a client may see: each one a status, a stable machine-readable code and a message.

Handlers raise :class:`ApiError`; the error middleware turns it, any aiohttp HTTP exception and
anything unexpected into ``{"error": {"code", "message"}}``. A stack trace never leaves the
process (it is logged with the request id instead).
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class DatabaseUnavailable(Exception):
    """PostgreSQL could not be reached or did not answer in time."""


class RedisUnavailable(Exception):
    """Redis failed, timed out, or is being skipped after a recent failure."""


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(404, code, message)


def database_unavailable() -> ApiError:
    return ApiError(
        503,
        "database_unavailable",
        "the database is unavailable; retry shortly",
        {"Retry-After": "5"},
    )
