"""The supervisor's restart policy and status file, on real tiny child processes."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tokvel_common.supervisor import (
    ServiceSpec,
    StackSettings,
    Supervisor,
    read_status,
    restart_delay,
    service_specs,
)


def _settings(**overrides: object) -> StackSettings:
    values: dict[str, object] = {
        "tokvel_stack_restart_backoff_seconds": 0.2,
        "tokvel_stack_restart_backoff_max_seconds": 0.8,
        "tokvel_stack_stop_timeout_seconds": 5.0,
        **overrides,
    }
    return StackSettings.model_validate(values)


def _step_until(supervisor: Supervisor, done: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the supervisor did not get there in time"
        supervisor.step()
        time.sleep(0.02)


def test_backoff_doubles_per_crash_in_a_row_up_to_the_cap() -> None:
    assert [restart_delay(n, 1.0, 30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_crashing_child_is_restarted_with_growing_delays(tmp_path: Path) -> None:
    crash = ServiceSpec("crash", (sys.executable, "-c", "import sys; sys.exit(3)"))
    supervisor = Supervisor([crash], _settings(), tmp_path)
    child = supervisor.children[0]
    supervisor.start_all()
    starts: list[float] = [time.monotonic()]
    try:
        while child.restarts < 3:
            before = child.restarts
            _step_until(supervisor, lambda: child.restarts > before)  # noqa: B023
            starts.append(time.monotonic())
    finally:
        supervisor.stop_all()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # 0.2, 0.4, 0.8 s of backoff (plus the child's own run time): each gap at least its delay.
    assert gaps[0] >= 0.2
    assert gaps[1] >= 0.4
    assert gaps[2] >= 0.8
    status = read_status(tmp_path)
    assert status is not None
    crash_status = status["services"]["crash"]  # type: ignore[index]
    assert crash_status["restarts"] == 3
    assert crash_status["last_exit"] == 3
    assert crash_status["last_restart"] is not None
    assert crash_status["state"] == "stopped"
    assert "=== " in (tmp_path / "services" / "crash.log").read_text()


def test_a_long_run_resets_the_crash_count(tmp_path: Path) -> None:
    spec = ServiceSpec("slow-crash", (sys.executable, "-c", "import time; time.sleep(0.3)"))
    settings = _settings(tokvel_stack_stable_seconds=0.2)
    supervisor = Supervisor([spec], settings, tmp_path)
    child = supervisor.children[0]
    supervisor.start_all()
    try:
        _step_until(supervisor, lambda: child.restarts >= 2)
    finally:
        supervisor.stop_all()
    assert child.crashes_in_a_row == 1  # each run outlived the stable time
    assert child.last_exit == 0


def test_stop_all_ends_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    stubborn = ServiceSpec(
        "stubborn",
        (
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)",
        ),
    )
    supervisor = Supervisor([stubborn], _settings(tokvel_stack_stop_timeout_seconds=0.5), tmp_path)
    supervisor.start_all()
    pid = supervisor.children[0].pid
    assert pid is not None
    time.sleep(0.3)  # the handler is installed
    supervisor.stop_all()
    assert not Path(f"/proc/{pid}").exists()
    status = read_status(tmp_path)
    assert status is not None
    assert status["services"]["stubborn"]["pid"] is None  # type: ignore[index]


@pytest.mark.parametrize(
    ("base_url", "has_replay"),
    [("http://127.0.0.1:8090", True), ("https://pro-api.coinmarketcap.com", False)],
)
def test_the_replay_server_runs_only_for_a_local_cmc(
    tmp_path: Path, base_url: str, has_replay: bool
) -> None:
    names = [s.name for s in service_specs(_settings(cmc_base_url=base_url), tmp_path)]
    expected = ["ingestor", "velocity", "writer", "gateway", "ws"]
    assert names == (["cmc-replay", *expected] if has_replay else expected)


def test_velocity_workers_get_their_own_ops_port_and_data_dir(tmp_path: Path) -> None:
    specs = service_specs(
        _settings(tokvel_stack_velocity_workers=2, tokvel_stack_services=["velocity"]), tmp_path
    )
    assert [(s.name, s.env["VELOCITY_OPS_PORT"]) for s in specs] == [
        ("velocity-1", "8093"),
        ("velocity-2", "8094"),
    ]
    assert specs[0].env["VELOCITY_DATA_DIR"] != specs[1].env["VELOCITY_DATA_DIR"]
