"""Process bookkeeping of ``tokvel infra`` on a real (harmless) process: ``sleep``."""

from __future__ import annotations

import shutil
from pathlib import Path

from tokvel_common.infra import process


def _spawn_sleep(tmp_path: Path) -> tuple[int, Path, tuple[str, ...]]:
    sleep = shutil.which("sleep")
    assert sleep is not None
    marker = "4242.5"  # an argument no other process on the machine has
    pid_path = tmp_path / "sleep.pid"
    pid = process.spawn_detached(
        [sleep, marker], log_path=tmp_path / "sleep.log", pid_path=pid_path
    )
    return pid, pid_path, (sleep, marker)


def test_spawned_process_is_detached_recorded_and_stopped(tmp_path: Path) -> None:
    pid, pid_path, markers = _spawn_sleep(tmp_path)
    try:
        assert process.read_pid(pid_path) == pid
        assert process.live_pid(pid_path, markers) == pid
        assert process.cmdline(pid).endswith("4242.5")
        sid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
        assert sid == pid  # a session of its own: a terminal's Ctrl-C does not reach it
        assert "tokvel infra up" in (tmp_path / "sleep.log").read_text()
    finally:
        process.terminate(pid, name="sleep", timeout=5)
    assert not process.is_running(pid)
    assert process.live_pid(pid_path, markers) is None


def test_stale_and_lost_pid_files_are_repaired(tmp_path: Path) -> None:
    pid, pid_path, markers = _spawn_sleep(tmp_path)
    try:
        process.write_pid(pid_path, 1)  # a live process, but not ours: pid reuse
        assert process.adopt(pid_path, markers) == pid  # found by its command line
        assert process.read_pid(pid_path) == pid
        pid_path.unlink()
        assert process.adopt(pid_path, markers) == pid
        assert process.read_pid(pid_path) == pid
    finally:
        process.terminate(pid, name="sleep", timeout=5)
    assert process.adopt(pid_path, markers) is None
    assert not pid_path.exists()  # the stale file is cleaned


def test_wait_until_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    false = shutil.which("false")
    assert false is not None
    log = tmp_path / "false.log"
    pid = process.spawn_detached([false], log_path=log, pid_path=tmp_path / "false.pid")
    try:
        process.wait_until(lambda: False, what="false", timeout=10, pid=pid, log_path=log)
    except process.InfraError as exc:
        assert "exited during startup" in str(exc)
        assert "tokvel infra up" in str(exc)  # the log's tail is quoted
    else:
        raise AssertionError("wait_until did not notice the exit")
