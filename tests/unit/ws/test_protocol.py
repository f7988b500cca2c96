"""Client message parsing and its error codes; server messages on the wire."""

from __future__ import annotations

import orjson
import pytest

from tests.support.ws import make_sample
from ws_broadcaster.protocol import (
    MAX_TOKENS_PER_MESSAGE,
    Error,
    Ping,
    ProtocolError,
    Snapshot,
    Subscribe,
    Unsubscribe,
    Update,
    encode_message,
    parse_client_message,
)


def test_subscribe_with_resume_points() -> None:
    message = parse_client_message(
        b'{"op": "subscribe", "token_ids": [1, 1027], "since_seq": {"1": 42}, "id": "r1"}'
    )
    assert message == Subscribe(op="subscribe", token_ids=[1, 1027], since_seq={1: 42}, id="r1")


def test_unsubscribe_and_ping() -> None:
    assert parse_client_message('{"op":"unsubscribe","token_ids":[5]}') == Unsubscribe(
        op="unsubscribe", token_ids=[5]
    )
    assert parse_client_message('{"op":"ping","id":7}') == Ping(op="ping", id=7)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b'{"op": "subscribe"', "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"subscribe"', "not_an_object"),
        (b"null", "not_an_object"),
        (b'{"token_ids": [1]}', "unknown_op"),
        (b'{"op": "SUBSCRIBE", "token_ids": [1]}', "unknown_op"),
        (b'{"op": 1}', "unknown_op"),
        (b'{"op": "subscribe"}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": []}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": ["1"]}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": [1.5]}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": [true]}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": [0]}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": [2147483648]}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": [1], "since_seq": {"x": 1}}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": [1], "since_seq": {"1": -5}}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": [1], "since_seq": [1]}', "invalid_message"),
        (b'{"op": "subscribe", "token_ids": [1], "extra": true}', "invalid_message"),
        (b'{"op": "ping", "id": {"nested": 1}}', "invalid_message"),
        (b'{"op": "ping", "id": "' + b"x" * 65 + b'"}', "invalid_message"),
    ],
)
def test_errors_have_codes(data: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        parse_client_message(data)
    assert raised.value.code == code
    assert raised.value.message


def test_too_many_tokens_in_one_message() -> None:
    ids = list(range(1, MAX_TOKENS_PER_MESSAGE + 2))
    with pytest.raises(ProtocolError) as raised:
        parse_client_message(orjson.dumps({"op": "subscribe", "token_ids": ids}))
    assert raised.value.code == "invalid_message"


def test_request_id_is_kept_for_the_error_answer() -> None:
    with pytest.raises(ProtocolError) as raised:
        parse_client_message(b'{"op": "subscribe", "token_ids": "all", "id": "abc"}')
    assert raised.value.request_id == "abc"
    assert "token_ids" in raised.value.message


def test_error_messages_are_bounded() -> None:
    with pytest.raises(ProtocolError) as raised:
        parse_client_message(orjson.dumps({"op": "subscribe", "token_ids": ["x" * 5000] * 10}))
    assert len(raised.value.message) <= 300


def test_server_messages_on_the_wire() -> None:
    sample = make_sample(1, minute=3)
    update = orjson.loads(encode_message(Update(token_id=1, seq=99, sample=sample)))
    assert update["op"] == "update"
    assert update["seq"] == 99
    assert update["sample"]["cmc_id"] == 1
    assert update["sample"]["ts"] == "2024-01-01T00:03:00+00:00"
    snapshot = orjson.loads(
        encode_message(Snapshot(token_id=5, seq=None, reason="subscribe", token=None, sample=None))
    )
    assert snapshot == {
        "op": "snapshot",
        "token_id": 5,
        "seq": None,
        "reason": "subscribe",
        "token": None,
        "sample": None,
    }
    error = orjson.loads(encode_message(Error(code="rate_limited", message="slow down")))
    assert error == {
        "op": "error",
        "id": None,
        "code": "rate_limited",
        "message": "slow down",
        "token_ids": None,
    }
