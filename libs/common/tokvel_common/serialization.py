"""The one place messages become bytes and bytes become models (orjson on the wire)."""

from __future__ import annotations

from typing import TypeVar

import orjson
from pydantic import BaseModel

ModelT = TypeVar("ModelT", bound=BaseModel)


class DecodeError(ValueError):
    """A message that is not JSON or does not fit its model; ``reason`` is machine-readable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(model: BaseModel) -> bytes:
    """A model as compact JSON; unset optional fields are written as ``null``, never dropped."""
    return orjson.dumps(model.model_dump(mode="python"))


def encode_key(cmc_id: int) -> bytes:
    """Kafka key of every tokvel topic: the CMC id as ASCII digits, so partitioning is stable."""
    return str(cmc_id).encode("ascii")


def decode(data: bytes | str, model: type[ModelT]) -> ModelT:
    """Parse and validate, turning every failure into a :class:`DecodeError`."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError("invalid_json", str(exc)) from exc
    if not isinstance(obj, dict):
        raise DecodeError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise DecodeError("schema_violation", str(exc)) from exc
