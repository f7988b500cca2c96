"""Real CMC entries into cmc.quotes.raw messages, and the dedupe ledger's rules."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

from ingestor.ledger import Ledger, published_key, to_micros
from ingestor.poller import build_quote
from ingestor.token_info import to_token_info
from tokvel_common.events import DeadLetter, RawQuote
from tokvel_common.paths import SHARED_DATA_DIR
from tokvel_common.serialization import decode, encode

REAL_ANSWERS = sorted((SHARED_DATA_DIR / "cmc-pro-api").glob("listings_v1_*.json"))
POLLED = datetime(2024, 5, 1, 12, 0, 5, tzinfo=UTC)


def _quote(raw: Any, listed_at: datetime | None = None) -> RawQuote | DeadLetter:
    return build_quote(
        raw, polled_at=POLLED, listed_at=listed_at, source="test", poll_id="p1", topic="raw"
    )


@pytest.mark.parametrize("path", REAL_ANSWERS, ids=lambda p: Path(p).name)
def test_real_v1_entries_become_messages_with_every_value_as_received(path: Path) -> None:
    answer = json.loads(path.read_text())
    listed_at = datetime.fromisoformat(answer["status"]["timestamp"])
    for original in answer["data"]:
        quote = _quote(original, listed_at)
        assert isinstance(quote, RawQuote)
        again = decode(encode(quote), RawQuote)
        assert again == quote
        assert (again.polled_at, again.listed_at, again.source, again.poll_id) == (
            POLLED, listed_at, "test", "p1",
        )  # fmt: skip
        usd = again.quote_in("USD")
        assert usd is not None
        for key in ("price", "volume_24h", "market_cap", "percent_change_1h", "percent_change_7d"):
            assert getattr(usd, key) == original["quote"]["USD"][key]
            assert type(getattr(usd, key)) is type(original["quote"]["USD"][key])
        assert again.tags == original["tags"] and again.platform == original["platform"]
        assert again.max_supply == original["max_supply"]


@pytest.mark.parametrize(
    "raw", [{"name": "no id"}, {"id": "one"}, ["not", "an", "object"], None], ids=repr
)
def test_entries_that_fit_no_model_become_dead_letters(raw: Any) -> None:
    letter = _quote(raw)
    assert isinstance(letter, DeadLetter)
    assert letter.reason == "invalid_entry" and letter.topic == "raw"
    assert json.loads(letter.raw) == raw


def _entry(cmc_id: int, minute: int) -> RawQuote:
    stamp = (datetime(2024, 5, 1, tzinfo=UTC) + timedelta(minutes=minute)).isoformat()
    quote = _quote({"id": cmc_id, "last_updated": stamp, "quote": {"USD": {"last_updated": stamp}}})
    assert isinstance(quote, RawQuote)
    return quote


def test_ledger_lets_through_only_entries_newer_than_the_published_ones() -> None:
    ledger = Ledger()
    assert ledger.claim(_entry(1, 0)) == "new"
    assert ledger.claim(_entry(1, 0)) == "already_published"
    assert ledger.claim(_entry(1, 5)) == "new"
    assert ledger.claim(_entry(1, 2)) == "older_than_published"  # a CMC regression
    assert ledger.claim(_entry(2, 0)) == "new"  # per token


def test_entries_without_any_time_are_never_deduplicated() -> None:
    quote = _quote({"id": 7, "quote": {"USD": {"price": 1.0}}})
    assert isinstance(quote, RawQuote) and published_key(quote) == (7, None)
    ledger = Ledger()
    assert [ledger.claim(quote), ledger.claim(quote)] == ["new", "new"]


def test_the_quote_time_is_the_event_time_of_the_key() -> None:
    quote = _quote(
        {
            "id": 1,
            "last_updated": "2024-05-01T00:00:00Z",
            "quote": [{"symbol": "USD", "last_updated": "2024-05-01T00:03:00Z"}],
        }
    )
    assert isinstance(quote, RawQuote)
    assert published_key(quote) == (1, to_micros(datetime(2024, 5, 1, 0, 3, tzinfo=UTC)))


def _meta(partition: int, offset: int) -> RecordMetadata:
    return RecordMetadata("raw", partition, TopicPartition("raw", partition), offset, 0, 0, -1)


def test_ledger_tracks_what_redis_lacks_until_saved() -> None:
    ledger = Ledger()
    first, second = _entry(1, 0), _entry(2, 0)
    ledger.claim(first)
    ledger.claim(second)
    assert ledger.pending() is None  # claimed is not delivered
    ledger.delivered([first, second], [_meta(0, 10), _meta(3, 4)])
    pending = ledger.pending()
    assert pending is not None
    entries, watermarks = pending
    assert entries == {1: published_key(first)[1], 2: published_key(second)[1]}
    assert watermarks == {0: 11, 3: 5}
    ledger.saved(entries)
    assert ledger.pending() is None


def test_merge_learns_only_newer_keys_from_the_topic() -> None:
    ledger = Ledger(newest={1: 100})
    ledger.merge([(1, 50), (1, 200), (2, 10), (3, None)])
    assert ledger.newest == {1: 200, 2: 10}
    pending = ledger.pending()
    assert pending is not None and pending[0] == {1: 200, 2: 10}


def test_token_info_takes_the_first_url_of_each_kind() -> None:
    fetched = datetime(2024, 5, 1, tzinfo=UTC)
    info = to_token_info(
        {
            "id": 1, "name": "Bitcoin", "symbol": "BTC", "slug": "bitcoin",
            "description": "Bitcoin (BTC) is a cryptocurrency.",
            "logo": "https://s2.coinmarketcap.com/static/img/coins/64x64/1.png",
            "urls": {
                "website": ["https://bitcoin.org/"], "twitter": [], "reddit": [
                    "https://reddit.com/r/bitcoin"
                ],
                "technical_doc": ["https://bitcoin.org/bitcoin.pdf"],
                "source_code": ["https://example.org/mirror", "https://github.com/bitcoin/bitcoin"],
            },
            "date_added": "2013-04-28T00:00:00.000Z",
        },
        fetched,
    )  # fmt: skip
    assert info is not None
    assert info.cmc_id == 1 and info.website_url == "https://bitcoin.org/"
    assert info.twitter_url is None and info.reddit_url == "https://reddit.com/r/bitcoin"
    assert info.github_url == "https://github.com/bitcoin/bitcoin"
    assert info.whitepaper_url == "https://bitcoin.org/bitcoin.pdf"
    assert info.date_added == datetime(2013, 4, 28, tzinfo=UTC) and info.fetched_at == fetched


@pytest.mark.parametrize("raw", [None, "x", {"name": "no id"}, {"id": 1, "urls": "junk"}])
def test_unusable_info_objects_are_none_or_ignore_junk(raw: Any) -> None:
    info = to_token_info(raw, datetime(2024, 5, 1, tzinfo=UTC))
    if isinstance(raw, dict) and "id" in raw:
        assert info is not None and info.website_url is None
    else:
        assert info is None
