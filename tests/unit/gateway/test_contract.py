"""The OpenAPI document, cursors, bucket alignment and numbers, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from api_gateway.errors import ApiError
from api_gateway.handlers.tokens import _ceil, _floor, decode_cursor, encode_cursor
from api_gateway.models import HistoryQuery, TokenListQuery
from api_gateway.openapi import build_openapi
from api_gateway.repository import LIST_AS_OF, LIST_LATEST, to_number


def refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                found.add(value)
            else:
                found |= refs(value)
    elif isinstance(node, list):
        for item in node:
            found |= refs(item)
    return found


def test_every_reference_resolves_and_no_query_parameter_is_nullable() -> None:
    spec = build_openapi()
    schemas = spec["components"]["schemas"]
    for ref in refs(spec):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    for path, item in spec["paths"].items():
        for parameter in item["get"].get("parameters", ()):
            assert "null" not in str(parameter["schema"]), (path, parameter)


def test_query_models_refuse_unknown_parameters_and_bad_values() -> None:
    assert TokenListQuery.model_validate({"limit": "10"}).limit == 10
    with pytest.raises(ValueError, match="extra"):
        TokenListQuery.model_validate({"limt": "10"})
    with pytest.raises(ValueError, match="1970"):
        HistoryQuery.model_validate({"from": "1900-01-01T00:00:00Z"})
    naive = HistoryQuery.model_validate({"to": "2017-08-10T00:00:00"})
    assert naive.to == datetime(2017, 8, 10, tzinfo=UTC)


def test_cursor_round_trip_and_tampering() -> None:
    moment = datetime(2017, 8, 10, 12, 5, 5, 123456, tzinfo=UTC)
    cursor = encode_cursor(moment, "abcd")
    assert decode_cursor(cursor, "abcd") == moment
    with pytest.raises(ApiError) as other:
        decode_cursor(cursor, "efgh")
    assert other.value.code == "invalid_cursor"
    for bad in ("!!!", "YQ", "Yzk5LjEyMy5hYmNk", "c1." + "9" * 40):
        with pytest.raises(ApiError):
            decode_cursor(bad, "abcd")


def test_buckets_align_to_utc() -> None:
    moment = datetime(2017, 8, 10, 12, 34, 56, tzinfo=UTC)
    assert _floor(moment, timedelta(hours=1)) == datetime(2017, 8, 10, 12, tzinfo=UTC)
    assert _ceil(moment, timedelta(hours=1)) == datetime(2017, 8, 10, 13, tzinfo=UTC)
    assert _floor(moment, timedelta(days=1)) == datetime(2017, 8, 10, tzinfo=UTC)
    exact = datetime(2017, 8, 10, tzinfo=UTC)
    assert _ceil(exact, timedelta(days=1)) == exact


def test_numbers_come_back_as_they_were_sent() -> None:
    assert to_number(Decimal("55193041650")) == 55193041650
    assert isinstance(to_number(Decimal("55193041650")), int)
    assert to_number(Decimal("3345.37")) == 3345.37
    assert to_number(Decimal("1E-8")) == 1e-8
    assert to_number(Decimal("NaN")) is None
    assert to_number(None) is None


def test_every_sort_has_its_statements_and_a_cmc_id_tiebreak() -> None:
    assert len(LIST_LATEST) == len(LIST_AS_OF) == 18
    for statement in (*LIST_LATEST.values(), *LIST_AS_OF.values()):
        assert "NULLS LAST, cmc_id ASC" in statement
