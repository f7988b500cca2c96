"""``tokvel up / status / down`` with the real detached supervisor, on trivial real commands.

TOKVEL_STACK_COMMANDS replaces the tokvel services with a web server and a command that
crashes every second; a temporary run dir keeps it all away from the shared stack.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tokvel_common.infra import process
from tokvel_common.supervisor import read_status


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def stack_env(tmp_path: Path) -> dict[str, str]:
    port = _free_port()
    commands = {
        "web": {
            "argv": [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
            "health_url": f"http://127.0.0.1:{port}/",
        },
        "crash": {"argv": [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"]},
    }
    return {
        **os.environ,
        "TOKVEL_RUN_DIR": str(tmp_path),
        "TOKVEL_STACK_COMMANDS": json.dumps(commands),
        "TOKVEL_STACK_RESTART_BACKOFF_SECONDS": "0.2",
        "TOKVEL_STACK_RESTART_BACKOFF_MAX_SECONDS": "0.2",
        "TOKVEL_STACK_STOP_TIMEOUT_SECONDS": "5",
        "TOKVEL_STACK_START_TIMEOUT_SECONDS": "30",
    }


def _tokvel(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokvel_common.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _services(run_dir: Path) -> dict[str, dict[str, object]]:
    status = read_status(run_dir)
    assert status is not None
    services: dict[str, dict[str, object]] = status["services"]  # type: ignore[assignment]
    return services


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_crashes_are_restarted_and_counted_and_down_leaves_no_child(
    tmp_path: Path, stack_env: dict[str, str]
) -> None:
    up = _tokvel(stack_env, "up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        supervisor = process.read_pid(tmp_path / "supervisor.pid")
        assert supervisor is not None and process.is_running(supervisor)

        # The crashing command is started again and again, each time counted.
        _wait(lambda: int(str(_services(tmp_path)["crash"]["restarts"])) >= 2)
        assert _services(tmp_path)["crash"]["last_exit"] == 3

        # A service killed from outside is restarted too, under a new pid.
        web_pid = _services(tmp_path)["web"]["pid"]
        assert isinstance(web_pid, int)
        os.kill(web_pid, signal.SIGKILL)
        _wait(
            lambda: (
                _services(tmp_path)["web"]["restarts"] == 1
                and _services(tmp_path)["web"]["state"] == "running"
            )
        )
        assert _services(tmp_path)["web"]["last_exit"] == -signal.SIGKILL

        _wait(lambda: "up" in _tokvel(stack_env, "status").stdout.split("\n")[2])
        status = _tokvel(stack_env, "status")
        assert status.returncode == 0
        web_row = next(line for line in status.stdout.splitlines() if line.startswith("web "))
        assert web_row.split()[2:4] == ["up", "1"]  # state, restarts

        logs = _tokvel(stack_env, "logs", "supervisor")
        assert "web exited (-9)" in logs.stdout
    finally:
        down = _tokvel(stack_env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    services = _services(tmp_path)
    assert all(service["pid"] is None for service in services.values())
    assert not process.is_running(supervisor)
    # No process is left that was started for this run dir's services.
    web_argv = json.loads(stack_env["TOKVEL_STACK_COMMANDS"])["web"]["argv"]
    assert process.find_process(web_argv) is None
    assert process.find_process(["import sys, time; time.sleep(1); sys.exit(3)"]) is None
    assert _tokvel(stack_env, "status").returncode == 3
