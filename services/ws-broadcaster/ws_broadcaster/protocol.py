"""The WebSocket wire protocol: pydantic models of every client and server message.

Client → server (JSON text frames)::

    {"op": "subscribe", "token_ids": [1, 1027], "since_seq": {"1": 5497558138880}, "id": "r1"}
    {"op": "unsubscribe", "token_ids": [1027], "id": "r2"}
    {"op": "ping", "id": "r3"}

``id`` (optional, a string of at most 64 characters or an integer) is echoed in the answer.
``since_seq`` (optional) maps token ids to the ``seq`` of the last update the client received:
the updates after it are replayed, or a fresh snapshot is sent when they are no longer buffered.

Server → client: ``subscribed``, ``unsubscribed``, ``pong``, ``error``, ``snapshot``, ``update``
(see :class:`Subscribed` ... :class:`Update`). A malformed client message is answered with an
``error`` carrying one of :data:`ErrorCode`; the connection stays open.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictInt, ValidationError

from tokvel_common.cache import TokenMetadata
from tokvel_common.events import MetricsSample
from tokvel_common.serialization import DecodeError, decode, encode

MAX_TOKEN_ID: Final = 2**31 - 1
MAX_TOKENS_PER_MESSAGE: Final = 1000
MAX_REQUEST_ID_LENGTH: Final = 64
MAX_ERROR_MESSAGE_LENGTH: Final = 300

TokenId = Annotated[StrictInt, Field(ge=1, le=MAX_TOKEN_ID)]
Seq = Annotated[StrictInt, Field(ge=0)]
RequestId = Annotated[str, Field(max_length=MAX_REQUEST_ID_LENGTH)] | StrictInt | None

ErrorCode = Literal[
    "invalid_json",  # the frame is not JSON
    "not_an_object",  # JSON, but not an object
    "unknown_op",  # "op" missing or not one of subscribe, unsubscribe, ping
    "invalid_message",  # a known op with missing, extra or ill-typed fields
    "binary_not_supported",  # the protocol is JSON text frames only
    "too_many_subscriptions",  # the key's tier allows fewer tokens per connection
    "rate_limited",  # too many messages per second; the message was ignored
    "snapshot_unavailable",  # neither Redis nor PostgreSQL answered; not subscribed, retry
]


class _ClientMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: RequestId = None


class Subscribe(_ClientMessage):
    op: Literal["subscribe"]
    token_ids: list[TokenId] = Field(min_length=1, max_length=MAX_TOKENS_PER_MESSAGE)
    # JSON object keys are strings: "1" is read as token 1 (lax mode), values must be integers.
    since_seq: dict[Annotated[int, Field(ge=1, le=MAX_TOKEN_ID)], Seq] | None = Field(
        default=None, max_length=MAX_TOKENS_PER_MESSAGE
    )


class Unsubscribe(_ClientMessage):
    op: Literal["unsubscribe"]
    token_ids: list[TokenId] = Field(min_length=1, max_length=MAX_TOKENS_PER_MESSAGE)


class Ping(_ClientMessage):
    op: Literal["ping"]


ClientMessage = Subscribe | Unsubscribe | Ping


class _Envelope(RootModel[Annotated[ClientMessage, Field(discriminator="op")]]):
    pass


class ProtocolError(Exception):
    """A client message that cannot be acted on; answered with an ``error``, connection kept."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | int | None = None):
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message[:MAX_ERROR_MESSAGE_LENGTH]
        self.request_id = request_id


class _IdOnly(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: RequestId = None


def _request_id(data: bytes | str) -> str | int | None:
    """The ``id`` of a message that failed validation, when it has a usable one."""
    try:
        decoded = decode(data, _IdOnly)
    except DecodeError:
        return None
    return decoded.id


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        # The first location item is the union tag ("subscribe"), which the client knows.
        location = ".".join(str(item) for item in error["loc"][1:]) or "message"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


def parse_client_message(data: bytes | str) -> ClientMessage:
    """A client frame as a model, or :class:`ProtocolError` with a machine-readable code."""
    try:
        return decode(data, _Envelope).root
    except DecodeError as exc:
        if exc.reason == "invalid_json":
            raise ProtocolError("invalid_json", "the message is not valid JSON") from None
        if exc.reason == "not_an_object":
            raise ProtocolError("not_an_object", "the message must be a JSON object") from None
        cause = exc.__cause__
        request_id = _request_id(data)
        if isinstance(cause, ValidationError):
            types = {error["type"] for error in cause.errors()}
            if types & {"union_tag_invalid", "union_tag_not_found"}:
                raise ProtocolError(
                    "unknown_op",
                    "op must be one of: subscribe, unsubscribe, ping",
                    request_id,
                ) from None
            raise ProtocolError("invalid_message", _describe(cause), request_id) from None
        raise ProtocolError("invalid_message", exc.detail, request_id) from None


# ------------------------------------------------------------------------------ server → client


class _ServerMessage(BaseModel):
    model_config = ConfigDict(frozen=True)


class Subscribed(_ServerMessage):
    """The tokens now subscribed; ``resumed`` are those whose ``since_seq`` was honoured (their
    missed updates follow, no snapshot); every other newly subscribed token gets a snapshot."""

    op: Literal["subscribed"] = "subscribed"
    id: str | int | None = None
    token_ids: list[int]
    resumed: list[int] = Field(default_factory=list)


class Unsubscribed(_ServerMessage):
    op: Literal["unsubscribed"] = "unsubscribed"
    id: str | int | None = None
    token_ids: list[int]


class Pong(_ServerMessage):
    op: Literal["pong"] = "pong"
    id: str | int | None = None


class Error(_ServerMessage):
    op: Literal["error"] = "error"
    id: str | int | None = None
    code: ErrorCode
    message: str
    token_ids: list[int] | None = None


SnapshotReason = Literal["subscribe", "resume_gap"]


class Snapshot(_ServerMessage):
    """A token's current state. ``seq`` is the seq of the newest update this instance had seen
    for the token when the snapshot was taken (null: none since it started); the updates that
    follow have greater seqs. ``reason`` says whether it answers a plain subscribe or a resume
    whose gap was no longer buffered. ``token`` or ``sample`` is null while unknown."""

    op: Literal["snapshot"] = "snapshot"
    token_id: int
    seq: int | None
    reason: SnapshotReason
    token: TokenMetadata | None
    sample: MetricsSample | None


class Update(_ServerMessage):
    """One new sample of ``token.metrics``; ``seq`` grows with every update of a token."""

    op: Literal["update"] = "update"
    token_id: int
    seq: int
    sample: MetricsSample


ServerMessage = Subscribed | Unsubscribed | Pong | Error | Snapshot | Update


def encode_message(message: ServerMessage) -> bytes:
    """A server message as the bytes of one text frame (orjson, via the shared serializer)."""
    return encode(message)
