"""The whole stack as ``make up`` runs it: ``tokvel up`` as a subprocess, on a test's own resources.

``make up`` is ``.venv/bin/tokvel up``: a detached supervisor (:mod:`tokvel_common.supervisor`)
that runs the six services. :class:`SupervisedStack` runs the same command, and ``tokvel down``,
``status`` and ``logs``, with an environment of the test's own: run dir, database, topic prefix,
Redis database and service ports. Kafka, PostgreSQL and Redis are the shared local infra, which
``tokvel up`` only connects to (only ``tokvel demo`` and ``tokvel infra up`` start infra).

Every process of the stack inherits ``TOKVEL_RUN_DIR``, unique per test: that is how
:meth:`SupervisedStack.leftover_processes` finds any process that outlived ``tokvel down``,
whatever it was started as.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokvel_common.commands.stack_cmd import demo_environment
from tokvel_common.infra.layout import RUN_DIR_ENV
from tokvel_common.supervisor import StackSettings, read_status

# The console script `make up` runs, from the virtualenv running the tests.
TOKVEL = Path(sys.executable).with_name("tokvel")
# `tokvel up` waits up to TOKVEL_STACK_START_TIMEOUT_SECONDS (120 s) for every /healthz, and
# `tokvel down` up to the stop timeout (30 s) plus 15 s for the supervisor: room beyond both.
COMMAND_TIMEOUT_SECONDS = 180.0
LOG_LINES_ON_FAILURE = 15


@dataclass(frozen=True)
class StackPorts:
    """The services' ports, under the environment variables the services read."""

    gateway: int
    ws: int
    replay: int
    ingestor_ops: int
    writer_ops: int
    velocity_ops: int

    def environment(self) -> dict[str, str]:
        return {
            "PORT": str(self.gateway),
            "WS_PORT": str(self.ws),
            "REPLAY_PORT": str(self.replay),
            "INGESTOR_OPS_PORT": str(self.ingestor_ops),
            "WRITER_OPS_PORT": str(self.writer_ops),
            "VELOCITY_OPS_PORT": str(self.velocity_ops),
        }

    def listening(self) -> list[int]:
        """The ports something still accepts connections on (loopback)."""
        found = []
        for port in self.environment().values():
            with socket.socket() as sock:
                sock.settimeout(1.0)
                if sock.connect_ex(("127.0.0.1", int(port))) == 0:
                    found.append(int(port))
        return found


@dataclass(frozen=True)
class ReplaySource:
    """The replay server as the stack's CMC: which recording, how much of it, how fast."""

    recording: Path
    snapshots: int
    poll_seconds: float


def stack_environment(
    *,
    run_dir: Path,
    ports: StackPorts,
    replay: ReplaySource,
    kafka_bootstrap_servers: str,
    database_url: str,
    redis_url: str,
    topic_prefix: str,
) -> dict[str, str]:
    """The environment of ``tokvel up``: the demo's settings (``tokvel demo`` sets the same
    overrides before its ``up``), on the given resources and the bounded replay."""
    demo = demo_environment(
        StackSettings(
            port=ports.gateway,
            replay_port=ports.replay,
            tokvel_demo_poll_seconds=replay.poll_seconds,
        )
    )
    # Without VELOCITY_DATA_DIR the worker keeps its tables in the run dir, not in a shared dir.
    env = {name: value for name, value in os.environ.items() if name != "VELOCITY_DATA_DIR"}
    env.update(demo)
    env.update(ports.environment())
    env.update(
        {
            RUN_DIR_ENV: str(run_dir),
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap_servers,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "TOPIC_PREFIX": topic_prefix,
            "TOKVEL_REPLAY_DATA": str(replay.recording),
            "REPLAY_SNAPSHOTS": str(replay.snapshots),
        }
    )
    return env


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        text = f"$ {' '.join(self.argv)}  (exit {self.returncode})\n{self.stdout.rstrip()}"
        return f"{text}\n(stderr)\n{self.stderr.rstrip()}" if self.stderr.strip() else text


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def run_tokvel(
    env: Mapping[str, str], *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS
) -> CommandResult:
    argv = (str(TOKVEL), *args)
    try:
        done = subprocess.run(
            argv, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        stderr = f"{_text(exc.stderr)}\n(no exit after {timeout:.0f}s)"
        return CommandResult(argv, -1, _text(exc.stdout), stderr)
    return CommandResult(argv, done.returncode, done.stdout, done.stderr)


@dataclass
class SupervisedStack:
    run_dir: Path
    ports: StackPorts
    env: Mapping[str, str]

    def tokvel(self, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> CommandResult:
        return run_tokvel(self.env, *args, timeout=timeout)

    def up(self) -> CommandResult:
        """``tokvel up``: returns once every service answers its /healthz."""
        result = self.tokvel("up")
        assert result.returncode == 0, f"tokvel up failed\n{result.describe()}"
        return result

    def down(self) -> CommandResult:
        return self.tokvel("down")

    def create_key(self, name: str, tier: str) -> str:
        """A new API key from ``tokvel keys create`` (the plaintext key is its last line)."""
        result = self.tokvel("keys", "create", "--name", name, "--tier", tier, timeout=60)
        lines = result.stdout.strip().splitlines()
        assert result.returncode == 0 and lines, f"no API key\n{result.describe()}"
        return lines[-1].strip()

    def services(self) -> dict[str, dict[str, object]]:
        """What the supervisor's status file says of each service ({} before it is written)."""
        status = read_status(self.run_dir) or {}
        services = status.get("services", {})
        assert isinstance(services, dict)
        return services

    def diagnostics(self) -> str:
        """``tokvel status`` and the tail of every log: what a failure message needs."""
        status = self.tokvel("status", timeout=60)
        logs = self.tokvel("logs", "-n", str(LOG_LINES_ON_FAILURE), timeout=60)
        return f"--- stack status\n{status.describe()}\n--- stack logs\n{logs.describe()}"

    @contextmanager
    def explained(self) -> Iterator[None]:
        """A failed assertion or an expired deadline inside, with the stack's state appended."""
        try:
            yield
        except (AssertionError, TimeoutError) as exc:
            message = str(exc) or type(exc).__name__
            raise AssertionError(f"{message}\n\n{self.diagnostics()}") from exc

    def leftover_processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every live process started with this stack's run dir."""
        marker = f"{RUN_DIR_ENV}={self.run_dir}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                command = (entry / "cmdline").read_bytes()
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if marker in environ.split(b"\0") and command:  # a zombie has no command line
                found.append((int(entry.name), command.replace(b"\0", b" ").decode().strip()))
        return found
