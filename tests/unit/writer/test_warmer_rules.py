"""The warming and predictive-caching rules, without Redis."""

from __future__ import annotations

from writer.warmer import merge_counts, needs_refresh, select_popular, warm_reason


def test_warm_reasons() -> None:
    a, b = frozenset({"run-a"}), frozenset({"run-b"})
    assert warm_reason(None, a, sentinel_present=True) == "start"
    assert warm_reason(a, b, sentinel_present=True) == "restart"
    assert warm_reason(a, a, sentinel_present=False) == "flush"
    assert warm_reason(a, a, sentinel_present=True) is None


def test_popular_tokens_are_the_most_read_above_the_threshold() -> None:
    counts = merge_counts([[(b"1", 5.0), (b"2", 1.0)], [(b"2", 2.0), (b"3", 9.0), (b"4", 3.0)]])
    assert counts == {1: 5.0, 2: 3.0, 3: 9.0, 4: 3.0}
    assert select_popular(counts, min_hits=3, top_k=3) == [3, 1, 2]
    assert select_popular(counts, min_hits=6, top_k=10) == [3]


def test_a_key_is_refreshed_when_it_expires_within_the_look_ahead_or_is_gone() -> None:
    assert needs_refresh(-2, 20)  # gone
    assert needs_refresh(-1, 20)  # no TTL: not written by us, rewrite it with one
    assert needs_refresh(19_999, 20)
    assert not needs_refresh(20_000, 20)
