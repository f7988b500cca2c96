"""Fault specs and the order in which armed faults spoil requests."""

from __future__ import annotations

import pytest

from ingestor.replay_faults import FaultPlan, FaultSpecError, parse_fault


def test_named_faults_answer_like_cmc() -> None:
    fault = parse_fault("minute_rate_limit")
    assert (fault.http, fault.code, fault.count, fault.after) == (429, 1008, 1, 0)
    assert (parse_fault("invalid_key").http, parse_fault("invalid_key").code) == (401, 1001)
    custom = parse_fault("error:http=200,code=1009")
    assert (custom.http, custom.code) == (200, 1009)
    slow = parse_fault("slow:delay=2.5,path=/v3")
    assert (slow.delay, slow.path) == (2.5, "/v3")


@pytest.mark.parametrize(
    "spec", ["nonsense", "slow:delay", "slow:delay=abc", "server_error:count=0", "slow:color=red"]
)
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(FaultSpecError):
        parse_fault(spec)


def _run(plan: FaultPlan, requests: int, path: str = "/v3/x") -> list[str | None]:
    return [f.kind if (f := plan.next_for(path)) else None for _ in range(requests)]


def test_after_count_and_every() -> None:
    plan = FaultPlan()
    plan.add(parse_fault("server_error:after=2,count=2,every=3"))
    assert _run(plan, 12) == [
        None, None, "server_error", "server_error",
        None, None, None, "server_error", "server_error",
        None, None, None,
    ]  # fmt: skip


def test_one_shot_faults_are_spent_and_fire_in_order() -> None:
    plan = FaultPlan()
    plan.add(parse_fault("minute_rate_limit"))
    plan.add(parse_fault("malformed"))
    assert _run(plan, 3) == ["minute_rate_limit", "malformed", None]
    assert plan.faults == []


def test_a_path_filter_lets_other_paths_through_uncounted() -> None:
    plan = FaultPlan()
    plan.add(parse_fault("slow:path=/v2,after=1"))
    assert _run(plan, 2, "/v3/cryptocurrency/listings/latest") == [None, None]
    assert _run(plan, 2, "/v2/cryptocurrency/info") == [None, "slow"]
