"""Structured JSON logs on stdout, one object per line, with the service name on every record.

Secrets never reach a log: DSNs are masked by :func:`mask_dsn` before they are logged,
settings hold keys as ``SecretStr`` so an accidental ``repr`` shows ``**********``, and the HTTP
services' access log (:class:`AccessLogger`) redacts secret query parameters (the WebSocket
takes the API key as ``api_key`` from browsers, and aiohttp's own access log writes the request
line as it came).
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import orjson
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route every logger (ours, aiokafka's, faust's) through one JSON handler on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced, safe to log."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


SECRET_QUERY_PARAMETERS: Final = frozenset({"api_key"})
REDACTED: Final = "REDACTED"


def loggable_target(request: web.BaseRequest) -> str:
    """The request's path and query, the value of every secret query parameter redacted."""
    query = request.query
    if not any(name.lower() in SECRET_QUERY_PARAMETERS for name in query):
        return request.path_qs
    redacted = request.rel_url.with_query(
        [(k, REDACTED if k.lower() in SECRET_QUERY_PARAMETERS else v) for k, v in query.items()]
    )
    return str(redacted)


class AccessLogger(AbstractAccessLogger):
    """One line per request, secrets redacted (``web.run_app(access_log_class=AccessLogger)``)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        target = loggable_target(request)
        self.logger.info(
            "%s %s %s",
            request.method,
            target,
            response.status,
            extra={
                "method": request.method,
                "target": target,
                "status": response.status,
                "bytes": response.body_length,
                "seconds": round(time, 6),
                "remote": request.remote,
                "user_agent": request.headers.get("User-Agent", ""),
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
