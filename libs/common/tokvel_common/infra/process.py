"""Detached processes tracked by pid files: start, recognise, wait for and stop them.

A pid file alone is not proof: pids are reused, so a recorded pid only counts while the
process's command line still names the same program and our own config file ("markers").
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

LOOPBACK = "127.0.0.1"
POLL_SECONDS = 0.1


class InfraError(Exception):
    """A failure the user can act on; the message says what happened and what to look at."""


def say(message: str) -> None:
    """One line of progress for the person at the terminal (flushed: steps take seconds)."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """Yields a function returning the seconds elapsed since the block started."""
    start = time.monotonic()
    yield lambda: time.monotonic() - start


def read_pid(pid_path: Path) -> int | None:
    try:
        text = pid_path.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text[0]) if text and text[0].isdigit() else None


def write_pid(pid_path: Path, pid: int) -> None:
    # Written then renamed, so a reader never sees a half-written number.
    tmp = pid_path.with_name(pid_path.name + ".tmp")
    tmp.write_text(f"{pid}\n", encoding="ascii")
    tmp.replace(pid_path)


def _reap(pid: int) -> None:
    """Collect the exit status if ``pid`` is our own dead child, so it is not left a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie answers kill(0) but is gone)."""
    _reap(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in {"Z", "X"}


def cmdline(pid: int) -> str:
    """The command line of ``pid`` with arguments joined by spaces ("" when it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", errors="replace").strip()


def matches(pid: int, markers: Sequence[str]) -> bool:
    return is_running(pid) and all(marker in cmdline(pid) for marker in markers)


def find_process(markers: Sequence[str]) -> int | None:
    """A running process whose command line holds every marker (our pid file may be lost)."""
    own = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != own and matches(int(entry.name), markers):
            return int(entry.name)
    return None


def live_pid(pid_path: Path, markers: Sequence[str]) -> int | None:
    """The running process a pid file stands for, checked against its markers; read-only."""
    pid = read_pid(pid_path)
    if pid is not None and matches(pid, markers):
        return pid
    return find_process(markers)


def adopt(pid_path: Path, markers: Sequence[str]) -> int | None:
    """Like :func:`live_pid`, but repairs the pid file: rewritten if lost, removed if stale."""
    pid = live_pid(pid_path, markers)
    if pid is None:
        pid_path.unlink(missing_ok=True)
    elif read_pid(pid_path) != pid:
        write_pid(pid_path, pid)
    return pid


def spawn_detached(
    argv: Sequence[str],
    *,
    log_path: Path,
    pid_path: Path,
    env: Mapping[str, str] | None = None,
    banner: str = "tokvel infra up",
) -> int:
    """Start ``argv`` in a session of its own, output appended to ``log_path``; records its pid.

    posix_spawn rather than Popen: the child must outlive this command, and a Popen object
    dropped while its child runs is reported as a leaked resource.
    """
    if not os.path.isabs(argv[0]):
        raise InfraError(f"internal error: {argv[0]!r} is not an absolute path")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"=== {stamp} {banner}: {' '.join(argv)}\n")
    file_actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    pid = os.posix_spawn(
        argv[0],
        list(argv),
        dict(env if env is not None else os.environ),
        file_actions=file_actions,
        setsid=True,
        # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: restore them.
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )
    write_pid(pid_path, pid)
    return pid


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def _signal(pid: int, sig: signal.Signals, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        # The group only when pid leads it: we started it with setsid, so the group is ours.
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def terminate(
    pid: int, *, name: str, timeout: float, first: signal.Signals = signal.SIGTERM
) -> None:
    """``first`` (SIGTERM), wait up to ``timeout`` s, then SIGKILL to the process and its group."""
    _signal(pid, first, group=False)
    if wait_gone(pid, timeout):
        return
    say(f"  {name}: still running {timeout:.0f}s after {first.name}, sending SIGKILL to pid {pid}")
    _signal(pid, signal.SIGKILL, group=True)
    if not wait_gone(pid, 10.0):
        raise InfraError(f"{name}: pid {pid} survived SIGKILL")


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"    | {line}" for line in tail) or f"(empty log {path})"


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    pid: int | None = None,
    log_path: Path | None = None,
    interval: float = 0.25,
) -> None:
    """Poll ``ready`` until it holds; fail early if ``pid`` dies, with the log's last lines."""
    deadline = time.monotonic() + timeout
    while not ready():
        if pid is not None and not is_running(pid):
            detail = f"\n  last lines of {log_path}:\n{log_tail(log_path)}" if log_path else ""
            raise InfraError(f"{what}: process {pid} exited during startup{detail}")
        if time.monotonic() >= deadline:
            detail = f"\n  last lines of {log_path}:\n{log_tail(log_path)}" if log_path else ""
            raise InfraError(f"{what}: not ready after {timeout:.0f}s{detail}")
        time.sleep(interval)


def run(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
    log_path: Path | None = None,
) -> str:
    """Run a command to completion (fixed argument list, no shell); its output, or InfraError.

    With ``log_path`` the output is also appended there, whether the command succeeds or not.
    """
    try:
        done = subprocess.run(  # noqa: S603 - fixed argument lists built by this package
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=new_session,
        )
    except subprocess.TimeoutExpired as exc:
        raise InfraError(f"{what}: still running after {timeout:.0f}s, gave up") from exc
    except OSError as exc:
        raise InfraError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    output = (done.stdout or "") + (done.stderr or "")
    if log_path is not None:
        with log_path.open("a", encoding="utf-8") as log:
            log.write(output)
    if done.returncode != 0:
        tail = "\n".join(f"    | {line}" for line in output.splitlines()[-20:])
        raise InfraError(f"{what} failed (exit {done.returncode}):\n{tail}")
    return output
