"""The supervisor of ``tokvel up``: the whole stack's services as children, restarted on crash.

``tokvel up`` starts one detached ``python -m tokvel_common.supervisor RUN_DIR``. It starts each
service (``tokvel run SERVICE``) as a child in a session of its own, output appended to
``RUN_DIR/services/<name>.log``; a child that exits is started again after a backoff that doubles
with each crash in a row (a child that ran for ``TOKVEL_STACK_STABLE_SECONDS`` starts the count
over). What it knows of each service is written to ``RUN_DIR/stack-status.json`` at every change,
which is what ``tokvel status`` reads. On SIGTERM or SIGINT it stops every child (SIGTERM, then
SIGKILL after ``TOKVEL_STACK_STOP_TIMEOUT_SECONDS``) and exits.

This library never imports a service, so the services' ports are read here from the same
environment variables the services read (``PORT``, ``WS_PORT``, ``*_OPS_PORT``...), with the
same defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Literal
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field

from tokvel_common import localstack
from tokvel_common.infra import process
from tokvel_common.settings import CommonSettings

SUPERVISOR_MODULE = "tokvel_common.supervisor"
STATUS_FILE = "stack-status.json"
SUPERVISOR_PID_FILE = "supervisor.pid"
SUPERVISOR_LOG_FILE = "supervisor.log"
SERVICES_DIR = "services"
LOOP_SECONDS = 0.2

ServiceState = Literal["running", "backoff", "stopped"]


class ServiceCommand(BaseModel):
    """A service given as a command line (``TOKVEL_STACK_COMMANDS``) instead of a tokvel one."""

    model_config = ConfigDict(frozen=True)

    argv: list[str] = Field(min_length=1)
    health_url: str | None = None


class StackSettings(CommonSettings):
    tokvel_demo_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="`tokvel demo`: POLL_INTERVAL_SECONDS of the ingestor; each poll replays "
        "the next recorded 5-minute snapshot, so 1 s turns an hour of data into 12 s.",
    )
    tokvel_demo_wait_seconds: float = Field(
        default=300.0, gt=0, description="`tokvel demo`: longest wait for the first token."
    )
    tokvel_stack_services: list[str] | None = Field(
        default=None,
        description='JSON list of the services `tokvel up` runs, e.g. ["gateway","ws"]; by '
        "default all six with the local replay server as CMC_BASE_URL, else all but cmc-replay.",
    )
    tokvel_stack_commands: dict[str, ServiceCommand] | None = Field(
        default=None,
        description='JSON {"name": {"argv": [...], "health_url": "..."}}: supervise these '
        "commands instead of the tokvel services (tests, custom set-ups).",
    )
    tokvel_stack_velocity_workers: int = Field(
        default=1, ge=1, description="Velocity workers (each its own ops port, counting up)."
    )
    tokvel_stack_restart_backoff_seconds: float = Field(
        default=1.0, gt=0, description="Wait before restarting a crashed service; doubles..."
    )
    tokvel_stack_restart_backoff_max_seconds: float = Field(
        default=30.0, gt=0, description="...up to this, while the crashes come in a row."
    )
    tokvel_stack_stable_seconds: float = Field(
        default=60.0, gt=0, description="A service up this long has its crash count reset."
    )
    tokvel_stack_stop_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="On stop, how long services get after SIGTERM before SIGKILL (the writer "
        "may take 20 s to flush).",
    )
    tokvel_stack_start_timeout_seconds: float = Field(
        default=120.0, gt=0, description="`tokvel up`: longest wait for every /healthz."
    )
    # The services' own settings, read under the services' env names (see the module doc).
    port: int = Field(default=8080, description="The gateway's port (PORT).")
    ws_port: int = Field(default=8081, description="The broadcaster's port (WS_PORT).")
    ingestor_ops_port: int = 8091
    writer_ops_port: int = 8092
    velocity_ops_port: int = 8093
    replay_port: int = localstack.CMC_REPLAY_PORT

    def replays_locally(self) -> bool:
        """True when CMC_BASE_URL is this machine's replay server, which the stack then runs."""
        url = urlsplit(self.cmc_base_url)
        return url.hostname in {"127.0.0.1", "localhost"} and url.port == self.replay_port


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    argv: tuple[str, ...]
    health_url: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)


def _local(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def service_specs(settings: StackSettings, run_dir: Path) -> list[ServiceSpec]:
    """What the supervisor runs, in start order (replay first: the ingestor polls it)."""
    if settings.tokvel_stack_commands is not None:
        # Processes are started by path (posix_spawn does not search PATH).
        return [
            ServiceSpec(
                name,
                (shutil.which(command.argv[0]) or command.argv[0], *command.argv[1:]),
                command.health_url,
            )
            for name, command in settings.tokvel_stack_commands.items()
        ]

    def tokvel(service: str) -> tuple[str, ...]:
        return (sys.executable, "-m", "tokvel_common.cli", "run", service)

    # The replay server has no /healthz; its state page answers as soon as it serves.
    specs = [
        ServiceSpec(
            "cmc-replay", tokvel("cmc-replay"), _local(settings.replay_port, "/_replay/state")
        )
    ]
    specs.append(
        ServiceSpec("ingestor", tokvel("ingestor"), _local(settings.ingestor_ops_port, "/healthz"))
    )
    workers = settings.tokvel_stack_velocity_workers
    data_dir = Path(os.environ.get("VELOCITY_DATA_DIR") or run_dir / "velocity")
    for index in range(workers):
        name = "velocity" if workers == 1 else f"velocity-{index + 1}"
        port = settings.velocity_ops_port + index
        env = {
            "VELOCITY_OPS_PORT": str(port),
            # Workers of one machine must not share table files; one alone keeps the usual dir.
            "VELOCITY_DATA_DIR": str(data_dir if workers == 1 else data_dir / name),
        }
        specs.append(ServiceSpec(name, tokvel("velocity"), _local(port, "/healthz"), env))
    specs.append(
        ServiceSpec("writer", tokvel("writer"), _local(settings.writer_ops_port, "/healthz"))
    )
    specs.append(ServiceSpec("gateway", tokvel("gateway"), _local(settings.port, "/healthz")))
    specs.append(ServiceSpec("ws", tokvel("ws"), _local(settings.ws_port, "/healthz")))

    wanted = settings.tokvel_stack_services
    if wanted is None:
        wanted = [s.name for s in specs if s.name != "cmc-replay" or settings.replays_locally()]
    # "velocity" in the list means every velocity worker.
    return [
        s
        for s in specs
        if s.name in wanted or (s.name.startswith("velocity-") and "velocity" in wanted)
    ]


def restart_delay(crashes_in_a_row: int, base: float, cap: float) -> float:
    """Seconds before the next start after the ``crashes_in_a_row``-th crash (1, 2, ...)."""
    return min(cap, base * 2.0 ** max(0, crashes_in_a_row - 1))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class Child:
    spec: ServiceSpec
    log_path: Path
    pid_path: Path
    pid: int | None = None
    state: ServiceState = "stopped"
    started_at: float = 0.0  # monotonic
    restarts: int = 0
    crashes_in_a_row: int = 0
    last_exit: int | None = None
    last_restart: str | None = None
    next_start: float = 0.0  # monotonic

    def as_status(self, now: float) -> dict[str, object]:
        return {
            "pid": self.pid,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_restart": self.last_restart,
            "restart_in": round(max(0.0, self.next_start - now), 1)
            if self.state == "backoff"
            else None,
            "health_url": self.spec.health_url,
            "argv": list(self.spec.argv),  # lets `tokvel down` recognise an orphaned service
            "log": str(self.log_path),
        }


class Supervisor:
    """Owns the children; driven by :meth:`step` (tests call it directly, :meth:`run` loops)."""

    def __init__(self, specs: Sequence[ServiceSpec], settings: StackSettings, run_dir: Path):
        self.settings = settings
        self.run_dir = run_dir
        services_dir = run_dir / SERVICES_DIR
        self.children = [
            Child(spec, services_dir / f"{spec.name}.log", services_dir / f"{spec.name}.pid")
            for spec in specs
        ]
        self.stopping = False

    @property
    def status_path(self) -> Path:
        return self.run_dir / STATUS_FILE

    def _start(self, child: Child) -> None:
        env = {**os.environ, **child.spec.env}
        child.pid = process.spawn_detached(
            child.spec.argv,
            log_path=child.log_path,
            pid_path=child.pid_path,
            env=env,
            banner="tokvel up",
        )
        child.state = "running"
        child.started_at = time.monotonic()

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)
        self.write_status()

    def _reap(self, child: Child) -> int | None:
        """The exit code of a child that has ended (negative: killed by that signal), else None."""
        if child.pid is None:
            return None
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:
            return -1  # not ours to wait for any more: gone, status unknown
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def step(self) -> None:
        """Notice exited children, schedule their restart, start those whose backoff is over."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            if child.state == "running":
                code = self._reap(child)
                if code is None:
                    continue
                uptime = now - child.started_at
                child.crashes_in_a_row = (
                    1
                    if uptime >= self.settings.tokvel_stack_stable_seconds
                    else child.crashes_in_a_row + 1
                )
                delay = restart_delay(
                    child.crashes_in_a_row,
                    self.settings.tokvel_stack_restart_backoff_seconds,
                    self.settings.tokvel_stack_restart_backoff_max_seconds,
                )
                child.pid, child.last_exit = None, code
                child.state, child.next_start = "backoff", now + delay
                child.pid_path.unlink(missing_ok=True)
                name = child.spec.name
                _log(f"{name} exited ({code}) after {uptime:.1f}s; restart in {delay:.1f}s")
                changed = True
            elif child.state == "backoff" and now >= child.next_start:
                self._start(child)
                child.restarts += 1
                child.last_restart = now_iso()
                _log(f"{child.spec.name} restarted (pid {child.pid}, restart {child.restarts})")
                changed = True
        if changed:
            self.write_status()

    def stop_all(self) -> None:
        """SIGTERM to every child at once, then wait (SIGKILL past the timeout) for each."""
        running = [(c, c.pid) for c in self.children if c.state == "running" and c.pid is not None]
        for _, pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.tokvel_stack_stop_timeout_seconds
        for child, pid in running:
            remaining = max(0.1, deadline - time.monotonic())
            process.terminate(pid, name=child.spec.name, timeout=remaining)
        for child in self.children:
            child.pid, child.state = None, "stopped"
            child.pid_path.unlink(missing_ok=True)
        self.write_status()

    def write_status(self) -> None:
        now = time.monotonic()
        status = {
            "supervisor_pid": os.getpid(),
            "updated_at": now_iso(),
            "services": {c.spec.name: c.as_status(now) for c in self.children},
        }
        # Written then renamed: `tokvel status` never reads a half-written file.
        tmp = self.status_path.with_name(STATUS_FILE + ".tmp")
        tmp.write_bytes(orjson.dumps(status, option=orjson.OPT_INDENT_2))
        tmp.replace(self.status_path)

    def run(self) -> None:
        self.start_all()
        try:
            while not self.stopping:
                self.step()
                time.sleep(LOOP_SECONDS)
        finally:
            self.stop_all()


def read_status(run_dir: Path) -> dict[str, object] | None:
    try:
        status: dict[str, object] = orjson.loads((run_dir / STATUS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return status


def supervisor_markers(run_dir: Path) -> tuple[str, ...]:
    """What identifies the supervisor of ``run_dir`` on its command line (see process.matches)."""
    return (SUPERVISOR_MODULE, str(run_dir))


def _log(message: str) -> None:
    # The supervisor's stdout is its log file (spawn_detached); one stamped line per event.
    sys.stdout.write(f"{now_iso()} {message}\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {SUPERVISOR_MODULE}", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="where the logs, pid and status files go")
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    settings = StackSettings()
    supervisor = Supervisor(service_specs(settings, run_dir), settings, run_dir)

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        _log(f"{signal.Signals(signum).name}: stopping the services")
        supervisor.stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    _log(f"supervising {', '.join(c.spec.name for c in supervisor.children)}")
    supervisor.run()
    _log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
