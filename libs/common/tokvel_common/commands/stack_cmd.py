"""``tokvel up|down|status|logs|demo``: the whole stack in the background, supervised.

``up`` starts one detached supervisor (:mod:`tokvel_common.supervisor`) that runs every service
and restarts the ones that crash; ``down`` stops it and with it every service; ``status`` reads
its status file and asks each service's ``/healthz``; ``logs`` shows the services' logs.
``demo`` is ``infra up`` + ``migrate`` + a demo API key + ``up`` on the recorded data, replayed
fast, and waits for the first token the REST API serves.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from tokvel_common import localstack
from tokvel_common.infra import process
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.process import InfraError, say
from tokvel_common.supervisor import (
    SERVICES_DIR,
    SUPERVISOR_LOG_FILE,
    SUPERVISOR_MODULE,
    SUPERVISOR_PID_FILE,
    StackSettings,
    read_status,
    supervisor_markers,
)

EXIT_NOT_RUNNING = 3  # the LSB status code for "not running"
DEMO_KEY_FILE = "demo-api-key"
DEMO_KEY_NAME = "demo"
DEMO_KEY_TIER = "pro"
# The recording holds one snapshot every 5 minutes: velocity's windows expect that spacing.
DEMO_EXPECTED_INTERVAL_SECONDS = 300
HTTP_TIMEOUT_SECONDS = 1.0
FOLLOW_POLL_SECONDS = 0.5


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up", help="start every service in the background, supervised (settings from the env)"
    )
    up.set_defaults(handler=_handled(_up))
    down = subparsers.add_parser("down", help="stop the services `tokvel up` started")
    down.set_defaults(handler=_handled(_down))
    status = subparsers.add_parser(
        "status", help="each service: pid, state, restarts, last exit, URL (exit 3: not running)"
    )
    status.set_defaults(handler=_handled(_status))
    logs = subparsers.add_parser("logs", help="the services' logs (one, or all interleaved)")
    logs.add_argument("service", nargs="?", help="a service name, or `supervisor`")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=40, help="lines of each log to show")
    logs.set_defaults(handler=_handled(_logs))
    demo = subparsers.add_parser(
        "demo",
        help="infra up, migrate, a demo API key, and the whole stack on the recorded data",
    )
    demo.set_defaults(handler=_handled(_demo))


def _handled(action: Callable[[argparse.Namespace, Layout], int]) -> Callable[..., int]:
    def handle(args: argparse.Namespace) -> int:
        layout = Layout.from_environment()
        try:
            return action(args, layout)
        except InfraError as exc:
            sys.stderr.write(f"tokvel {args.command}: error: {exc}\n")
            return 1

    return handle


# ------------------------------------------------------------------------------------- probes


def http_get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes] | None:
    """Status and body of a GET, or None when nothing answers (loopback URLs, short timeout)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port or 80, timeout=HTTP_TIMEOUT_SECONDS
    )
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path or "/", headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _healthy(url: str | None) -> bool:
    if url is None:
        return True
    answer = http_get(url)
    return answer is not None and answer[0] == 200


def _services(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = status.get("services", {})
    return services


def _supervisor_pid(layout: Layout) -> int | None:
    return process.live_pid(
        layout.run_dir / SUPERVISOR_PID_FILE, supervisor_markers(layout.run_dir)
    )


# ------------------------------------------------------------------------------------- status


def _state(service: Mapping[str, Any]) -> str:
    if service["state"] == "backoff":
        return f"restarting in {service['restart_in']:.0f}s"
    if service["state"] == "running":
        return "up" if _healthy(service["health_url"]) else "starting"
    return str(service["state"])


def _base_url(health_url: str | None) -> str:
    if health_url is None:
        return "-"
    parts = urlsplit(health_url)
    return f"{parts.scheme}://{parts.netloc}"


def render_status(layout: Layout) -> tuple[list[str], bool]:
    """The status table, and whether every service is up."""
    pid = _supervisor_pid(layout)
    status = read_status(layout.run_dir)
    if pid is None or status is None:
        return [
            f"the stack is not running (run dir {layout.run_dir}); `tokvel up` starts it"
        ], False
    lines = [f"supervisor pid {pid}, status of {status.get('updated_at')}"]
    row = "{:<12} {:>7}  {:<20} {:>8}  {:>9}  {:<25}  {}"
    lines.append(
        row.format("SERVICE", "PID", "STATE", "RESTARTS", "LAST EXIT", "LAST RESTART", "URL")
    )
    all_up = True
    for name, service in _services(status).items():
        state = _state(service)
        all_up = all_up and state == "up"
        last_exit = service["last_exit"]
        lines.append(
            row.format(
                name,
                service["pid"] or "-",
                state,
                service["restarts"],
                "-" if last_exit is None else last_exit,
                service["last_restart"] or "-",
                _base_url(service["health_url"]),
            )
        )
    return lines, all_up


def _status(_args: argparse.Namespace, layout: Layout) -> int:
    lines, _ = render_status(layout)
    say("\n".join(lines))
    return 0 if _supervisor_pid(layout) is not None else EXIT_NOT_RUNNING


# ----------------------------------------------------------------------------------- up, down


def start_stack(layout: Layout, settings: StackSettings) -> None:
    """Start the supervisor unless it runs, then wait until every service answers /healthz."""
    layout.ensure_run_dir()
    pid = _supervisor_pid(layout)
    if pid is not None:
        say(f"the stack is already running (supervisor pid {pid}); `tokvel down` stops it")
    else:
        (layout.run_dir / "stack-status.json").unlink(missing_ok=True)
        pid = process.spawn_detached(
            [sys.executable, "-m", SUPERVISOR_MODULE, str(layout.run_dir)],
            log_path=layout.run_dir / SUPERVISOR_LOG_FILE,
            pid_path=layout.run_dir / SUPERVISOR_PID_FILE,
            banner="tokvel up",
        )
        say(f"supervisor started (pid {pid}); logs in {layout.run_dir / SERVICES_DIR}")

    def all_up() -> bool:
        return render_status(layout)[1]

    try:
        process.wait_until(
            all_up,
            what="the stack",
            timeout=settings.tokvel_stack_start_timeout_seconds,
            pid=pid,
            log_path=layout.run_dir / SUPERVISOR_LOG_FILE,
            interval=1.0,
        )
    except InfraError as exc:
        say("\n".join(render_status(layout)[0]))
        raise InfraError(f"{exc}\n  each service's log: tokvel logs SERVICE") from exc


def _up(_args: argparse.Namespace, layout: Layout) -> int:
    with process.stopwatch() as elapsed:
        start_stack(layout, StackSettings())
    say("\n".join(render_status(layout)[0]))
    say(f"stack up in {elapsed():.1f}s")
    return 0


def stop_stack(layout: Layout, settings: StackSettings) -> None:
    """Stop the supervisor (it stops its services), then any service it left behind."""
    pid = _supervisor_pid(layout)
    status = read_status(layout.run_dir)
    if pid is not None:
        say(f"stopping the supervisor (pid {pid}) and its services")
        # Beyond the services' own grace: the supervisor needs it to SIGKILL the slow ones.
        process.terminate(
            pid, name="supervisor", timeout=settings.tokvel_stack_stop_timeout_seconds + 15
        )
    (layout.run_dir / SUPERVISOR_PID_FILE).unlink(missing_ok=True)
    # A supervisor killed outright leaves its services running: find them by the status file.
    for name, service in _services(status or {}).items():
        child = service.get("pid")
        if child is not None and process.matches(child, service["argv"]):
            say(f"  {name}: still running without a supervisor, stopping pid {child}")
            process.terminate(child, name=name, timeout=settings.tokvel_stack_stop_timeout_seconds)
        (layout.run_dir / SERVICES_DIR / f"{name}.pid").unlink(missing_ok=True)


def _down(_args: argparse.Namespace, layout: Layout) -> int:
    if _supervisor_pid(layout) is None and read_status(layout.run_dir) is None:
        say("the stack is not running")
        return 0
    with process.stopwatch() as elapsed:
        stop_stack(layout, StackSettings())
    say(f"stack stopped in {elapsed():.1f}s")
    return 0


# --------------------------------------------------------------------------------------- logs


def _log_paths(layout: Layout, service: str | None) -> dict[str, Path]:
    services_dir = layout.run_dir / SERVICES_DIR
    paths = {"supervisor": layout.run_dir / SUPERVISOR_LOG_FILE}
    paths.update({p.stem: p for p in sorted(services_dir.glob("*.log"))})
    if service is None:
        return paths
    if service not in paths:
        raise InfraError(f"no log for {service!r} (known: {', '.join(paths)})")
    return {service: paths[service]}


def _logs(args: argparse.Namespace, layout: Layout) -> int:
    paths = _log_paths(layout, args.service)
    prefix: Callable[[str], str] = (
        (lambda name: "") if len(paths) == 1 else (lambda name: f"{name:<12}| ")
    )
    offsets: dict[str, int] = {}
    for name, path in paths.items():
        data = path.read_bytes() if path.exists() else b""
        offsets[name] = len(data)
        for line in data.decode("utf-8", errors="replace").splitlines()[-args.lines :]:
            sys.stdout.write(prefix(name) + line + "\n")
    sys.stdout.flush()
    while args.follow:
        time.sleep(FOLLOW_POLL_SECONDS)
        for name, path in paths.items():
            with path.open("rb") as log:
                log.seek(offsets[name])
                chunk = log.read()
            # Only whole lines; a partial one is read again with its end next time.
            end = chunk.rfind(b"\n") + 1
            offsets[name] += end
            for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
                sys.stdout.write(prefix(name) + line + "\n")
        sys.stdout.flush()
    return 0


# --------------------------------------------------------------------------------------- demo


def _tokvel(*argv: str) -> list[str]:
    return [sys.executable, "-m", "tokvel_common.cli", *argv]


def create_demo_key() -> str:
    """A new `pro` key from ``tokvel keys create`` (its last line of stdout is the key)."""
    try:
        done = subprocess.run(  # noqa: S603 - a fixed argument list
            _tokvel("keys", "create", "--name", DEMO_KEY_NAME, "--tier", DEMO_KEY_TIER),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise InfraError("tokvel keys create: no answer after 60s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise InfraError(f"tokvel keys create failed (exit {done.returncode}):\n{done.stderr}")
    return lines[-1].strip()


def store_key(path: Path, key: str) -> None:
    """Written 0600 whatever the umask: the key is a credential."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(key + "\n")


def demo_key(layout: Layout) -> str:
    """The key of an earlier demo, or a new one."""
    path = layout.run_dir / DEMO_KEY_FILE
    if path.exists():
        key = path.read_text(encoding="ascii").strip()
        if key:
            return key
    key = create_demo_key()
    store_key(path, key)
    say(f"created the demo API key (tier {DEMO_KEY_TIER}), kept in {path}")
    return key


def first_tokens(gateway: str, key: str) -> list[dict[str, Any]] | int:
    """The first token served by the REST API, or the HTTP status when none (0: no answer)."""
    answer = http_get(f"{gateway}/v1/tokens?limit=1", {"X-API-Key": key})
    if answer is None:
        return 0
    code, body = answer
    if code != 200:
        return code
    data: list[dict[str, Any]] = orjson.loads(body)["data"]
    return data


def demo_environment(settings: StackSettings) -> dict[str, str]:
    """The demo's overrides: the local replay server, polled fast, with 5-minute windows."""
    return {
        "CMC_BASE_URL": f"http://127.0.0.1:{settings.replay_port}",
        "CMC_API_KEY": localstack.CMC_REPLAY_API_KEY,
        "POLL_INTERVAL_SECONDS": str(settings.tokvel_demo_poll_seconds),
        "VELOCITY_EXPECTED_INTERVAL_SECONDS": str(DEMO_EXPECTED_INTERVAL_SECONDS),
        # The dashboard is served by the gateway: its page may open the broadcaster's socket.
        "WS_ALLOWED_ORIGINS": orjson.dumps(
            [f"http://{host}:{settings.port}" for host in ("127.0.0.1", "localhost")]
        ).decode(),
    }


def _wait_first_token(layout: Layout, settings: StackSettings, gateway: str, key: str) -> str:
    deadline = time.monotonic() + settings.tokvel_demo_wait_seconds
    renewed = False
    while True:
        tokens = first_tokens(gateway, key)
        if isinstance(tokens, list) and tokens:
            say(f"first token served: {tokens[0].get('symbol')} (cmc_id {tokens[0]['cmc_id']})")
            return key
        if tokens in (401, 403) and not renewed:
            # The key file outlived the database it was created in (infra reset): a new one.
            say("the stored demo key is not accepted any more; creating a new one")
            key = create_demo_key()
            store_key(layout.run_dir / DEMO_KEY_FILE, key)
            renewed = True
        if time.monotonic() >= deadline:
            raise InfraError(
                f"no token served after {settings.tokvel_demo_wait_seconds:.0f}s "
                f"(last answer {tokens}); see tokvel status and tokvel logs"
            )
        time.sleep(1.0)


def _demo(_args: argparse.Namespace, layout: Layout) -> int:
    from tokvel_common.infra import stack

    with process.stopwatch() as elapsed:
        say("== infrastructure (Kafka, PostgreSQL, Redis)")
        stack.up(layout)
        # Set here so that every step below, and the supervisor's services, see the same values.
        os.environ.update(demo_environment(StackSettings()))
        settings = StackSettings()
        say("== migrations")
        say(process.run(_tokvel("migrate"), what="tokvel migrate", timeout=120).rstrip())
        key = demo_key(layout)
        say(
            f"== services (replay polled every {settings.tokvel_demo_poll_seconds:g}s, "
            "one recorded 5-minute snapshot per poll)"
        )
        start_stack(layout, settings)
        gateway = f"http://127.0.0.1:{settings.port}"
        say("== waiting for the first token")
        key = _wait_first_token(layout, settings, gateway, key)
        ready_in = elapsed()
    say("\n".join(render_status(layout)[0]))
    _print_urls(settings, gateway, key, layout)
    say(f"first data served {ready_in:.1f}s after `tokvel demo` started")
    return 0


def _print_urls(settings: StackSettings, gateway: str, key: str, layout: Layout) -> None:
    metrics: Sequence[tuple[str, int]] = (
        ("ingestor", settings.ingestor_ops_port),
        ("velocity", settings.velocity_ops_port),
        ("writer", settings.writer_ops_port),
        ("gateway", settings.port),
        ("ws", settings.ws_port),
    )
    say(
        "\n".join(
            [
                "",
                f"  dashboard  {gateway}/  (paste the API key below)",
                f"  API docs   {gateway}/docs",
                f"  REST       {gateway}/v1/tokens   (header X-API-Key)",
                f"  WebSocket  ws://127.0.0.1:{settings.ws_port}/v1/ws?api_key=<key>",
                "  metrics    "
                + "  ".join(f"http://127.0.0.1:{port}/metrics ({n})" for n, port in metrics),
                f"  API key    (in {layout.run_dir / DEMO_KEY_FILE})",
                "",
                f'  curl -H "X-API-Key: {key}" {gateway}/v1/tokens?limit=5',
                "  tokvel status | tokvel logs SERVICE -f | tokvel down",
                key,
            ]
        )
    )
