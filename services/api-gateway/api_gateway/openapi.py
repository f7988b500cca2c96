"""OpenAPI 3.1 of the gateway, generated from the route table and the pydantic models.

Schemas are the models' JSON Schemas (2020-12, which OpenAPI 3.1 uses as is), parameters are the
fields of the query models, and every operation lists the errors it can answer with their
bodies and headers; ``tests/integration/gateway/test_schemathesis.py`` holds the served app to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from api_gateway.models import ErrorResponse
from api_gateway.routes import API_ROUTES, RouteSpec

REF_TEMPLATE: Final = "#/components/schemas/{model}"
SECURITY_SCHEME: Final = "ApiKey"

_INTEGER: Final = {"type": "integer", "minimum": 0}
_STRING: Final = {"type": "string"}

# Rate-limit fields: on every answer to an authenticated request.
RATE_HEADERS: Final[dict[str, tuple[dict[str, Any], str]]] = {
    "X-RateLimit-Limit": (_INTEGER, "Requests allowed in the current minute."),
    "X-RateLimit-Remaining": (_INTEGER, "Requests left in the current minute."),
    "X-RateLimit-Reset": (_INTEGER, "Seconds until the minute window starts again."),
    "RateLimit-Policy": (
        _STRING,
        'IETF draft-ietf-httpapi-ratelimit-headers: the policies ("minute", "month").',
    ),
    "RateLimit": (_STRING, "IETF draft: remaining requests (r) and seconds to reset (t)."),
}
ERROR_DESCRIPTIONS: Final = {
    400: "Bad parameters.",
    401: "Missing or unknown API key.",
    403: "Revoked API key.",
    404: "No such token or symbol.",
    429: "Per-minute limit or monthly quota exceeded (see Retry-After).",
    503: "PostgreSQL is needed for this answer and is unavailable.",
}


def _package_version() -> str:
    try:
        return version("tokvel-api-gateway")
    except PackageNotFoundError:
        return "0.0.0"


def _strip_null(schema: dict[str, Any]) -> dict[str, Any]:
    """Optional query parameters are absent, never null: drop null branches and defaults."""
    schema = {k: v for k, v in schema.items() if k not in ("title", "default", "description")}
    branches = schema.get("anyOf")
    if branches:
        kept = [b for b in branches if b.get("type") != "null"]
        schema.pop("anyOf")
        if len(kept) == 1:
            schema.update(kept[0])
        else:
            schema["anyOf"] = kept
    return schema


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True, ref_template=REF_TEMPLATE)
    required = set(schema.get("required", ()))
    return [
        {
            "name": name,
            "in": "query",
            "required": name in required,
            "description": prop.get("description", ""),
            "schema": _strip_null(prop),
        }
        for name, prop in schema["properties"].items()
    ]


def _headers(required: bool, retry_after: bool = False) -> dict[str, Any]:
    headers = {
        name: {"description": text, "required": required, "schema": schema}
        for name, (schema, text) in RATE_HEADERS.items()
    }
    if retry_after:
        headers["Retry-After"] = {
            "description": "Seconds to wait before retrying.",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        }
    return headers


def _error(status: int, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERROR_DESCRIPTIONS[status],
        "content": {
            "application/json": {"schema": {"$ref": REF_TEMPLATE.format(model="ErrorResponse")}}
        },
    }
    if headers:
        response["headers"] = headers
    return response


def _operation(spec: RouteSpec) -> dict[str, Any]:
    content: dict[str, Any] = {
        "application/json": {"schema": {"$ref": REF_TEMPLATE.format(model=spec.response.__name__)}}
    }
    if spec.csv:
        content["text/csv"] = {"schema": {"type": "string"}}
    responses: dict[str, Any] = {
        "200": {"description": "OK", "headers": _headers(required=True), "content": content},
        "400": _error(400, _headers(required=False)),
        "401": _error(401),
        "403": _error(403),
    }
    if spec.not_found:
        responses["404"] = _error(404, _headers(required=False))
    responses["429"] = _error(429, _headers(required=True, retry_after=True))
    responses["503"] = _error(503)
    parameters = [
        {
            "name": p.name,
            "in": "path",
            "required": True,
            "description": p.description,
            "schema": p.schema,
        }
        for p in spec.path_params
    ]
    if spec.query is not None:
        parameters.extend(_query_parameters(spec.query))
    return {
        "operationId": spec.name,
        "summary": spec.summary,
        "description": spec.description,
        "tags": list(spec.tags),
        "security": [{SECURITY_SCHEME: []}],
        "parameters": parameters,
        "responses": responses,
    }


def _plain(description: str, media: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}


def _ops_paths() -> dict[str, Any]:
    status = {
        "type": "object",
        "properties": {
            "status": {"type": "string"},
            "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
        },
        "required": ["status"],
    }

    def get(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
        return {
            "get": {"summary": summary, "tags": ["ops"], "security": [], "responses": responses}
        }

    return {
        "/healthz": get("Liveness", {"200": _plain("Alive.", "application/json", status)}),
        "/readyz": get(
            "Readiness: PostgreSQL or Redis answers",
            {
                "200": _plain("Ready.", "application/json", status),
                "503": _plain("Not ready.", "application/json", status),
            },
        ),
        "/metrics": get(
            "Prometheus metrics", {"200": _plain("Metrics.", "text/plain", {"type": "string"})}
        ),
        "/openapi.json": get(
            "This document", {"200": _plain("OpenAPI 3.1.", "application/json", {"type": "object"})}
        ),
        "/docs": get(
            "API documentation (Swagger UI)",
            {"200": _plain("HTML.", "text/html", {"type": "string"})},
        ),
    }


def build_openapi(routes: Sequence[RouteSpec] = API_ROUTES) -> dict[str, Any]:
    models: list[type[BaseModel]] = [ErrorResponse, *(spec.response for spec in routes)]
    _, definitions = models_json_schema(
        [(model, "serialization") for model in models], ref_template=REF_TEMPLATE
    )
    paths: dict[str, Any] = {spec.path: {"get": _operation(spec)} for spec in routes}
    paths.update(_ops_paths())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tokvel API",
            "version": _package_version(),
            "description": "Token velocity (24 h volume / market cap) and its rolling windows, "
            "from CoinMarketCap data. Authenticate with the `X-API-Key` header. Every answer "
            "says how fresh its data is (`meta.as_of`, `meta.age_s`).",
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                SECURITY_SCHEME: {"type": "apiKey", "in": "header", "name": "X-API-Key"}
            },
        },
    }


def openapi_bytes() -> bytes:
    return orjson.dumps(build_openapi())
