"""The faults, each a step of a chaos plan that returns the figures it measured.

Every fault is undone by the step itself (a stopped Redis is continued, a stopped PostgreSQL
started again, a blackholed proxy healed), also when the step fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from api_gateway.settings import GatewaySettings
from tests.chaos.load import CallStats
from tests.chaos.stack import Chaos, ChaosError, eventually, log
from tokvel_common.drills.common import Figure
from tokvel_common.infra import kafka, pg_cluster, postgres, redis
from tokvel_common.infra.pg_cluster import cluster_of
from tokvel_common.infra.process import InfraError, live_pid, wait_gone
from tokvel_common.topics import METRICS

SERVICES = ("ingestor", "velocity", "writer", "gateway", "ws")
RECOVERY_SECONDS = 180.0  # a killed service back and healthy (Faust's start is the slowest)
SETTLE_SECONDS = 3.0  # between two kills: the restarted service does some work first
AFTER_FAULT_SECONDS = 2.0  # calls under way when a fault ends finish before they are counted
PIPELINE_SECONDS = 180.0  # new rows in token_metrics after a fault ends
DRAIN_TARGET_SECONDS = 120.0
DRAIN_LIMIT_SECONDS = 600.0
BIND_ATTEMPTS = 10
BIND_RETRY_SECONDS = 3.0
# The gateway's own timeouts (the suite runs it with its defaults).
GATEWAY_DB_TIMEOUT_SECONDS: float = GatewaySettings.model_fields["db_timeout_seconds"].default
GATEWAY_REDIS_TIMEOUT_SECONDS: float = GatewaySettings.model_fields["redis_timeout_seconds"].default
# How long an API call may take when a store does not answer: a request waits for Redis at
# most twice before the gateway's breaker opens, and for PostgreSQL at most twice in a row (the
# key, then the data); the slack is for a CPU shared with other work.
CALL_SLACK_SECONDS = 2.0
REDIS_AWAY_BOUND_SECONDS = 2 * GATEWAY_REDIS_TIMEOUT_SECONDS + CALL_SLACK_SECONDS
POSTGRES_AWAY_BOUND_SECONDS = (
    2 * GATEWAY_DB_TIMEOUT_SECONDS + 2 * GATEWAY_REDIS_TIMEOUT_SECONDS + CALL_SLACK_SECONDS
)


class Step(Protocol):
    @property
    def name(self) -> str: ...

    async def run(self, chaos: Chaos) -> list[Figure]: ...


def _seconds(value: float) -> str:
    return f"{value:.1f} s"


def _started(start: Callable[[], object], logs: Sequence[Path]) -> bool:
    """Run ``start``; False when it failed because a server found its port taken (as one of
    the servers' ``logs`` says)."""
    logged = {path: path.stat().st_size if path.exists() else 0 for path in logs}
    try:
        start()
    except InfraError:
        for path, size in logged.items():
            if not path.exists():
                continue
            with path.open("rb") as server_log:
                server_log.seek(size)
                if b"Address already in use" in server_log.read():
                    return False
        raise
    return True


async def start_again(start: Callable[[], object], logs: Sequence[Path], what: str) -> int:
    """Run ``start`` (blocking, in a thread) until the servers bind their ports; the attempts
    that found a port taken.

    Every stack port lies in Linux's ephemeral range (32768-60999), so any connection made on
    this machine may get one as its source port while the server is away: another program's
    (seen: a connection to another helper's service), or one of the server's own clients,
    which then connects to itself (TCP self-connect; aiokafka logs a CorrelationIdError as it
    reads its own request back). The server cannot bind until that connection is closed, which
    is soon.
    """
    for attempt in range(BIND_ATTEMPTS):
        if await asyncio.to_thread(_started, start, logs):
            return attempt
        log(f"  {what}: its port is taken (a client connected to itself?); again")
        await asyncio.sleep(BIND_RETRY_SECONDS)
    raise ChaosError(f"{what}: its port still taken after {BIND_ATTEMPTS} attempts")


def _calls_figures(
    chaos: Chaos, what: str, window: tuple[float, float], *, postgres_away: bool
) -> list[Figure]:
    """The slowest API call during ``window``, and the calls that did not answer 200; while
    PostgreSQL is away 503 is the answer wanted for what only PostgreSQL has."""
    calls, excluded = chaos.api_calls(*window)
    stats = CallStats.of(calls)
    note = f" (+{excluded} that met a killed gateway, not counted)" if excluded else ""
    log(f"  API meanwhile: {stats.describe()}{note}")
    bound = POSTGRES_AWAY_BOUND_SECONDS if postgres_away else REDIS_AWAY_BOUND_SECONDS
    slowest = Figure(
        f"slowest API call, {what}",
        _seconds(stats.max_seconds),
        f"≤ {bound:g} s",
        stats.calls > 0 and stats.max_seconds <= bound,
    )
    if not postgres_away:
        errors = Figure(
            f"API errors, {what}", stats.error_share(), "0", stats.calls > 0 and not stats.failed
        )
    else:
        errors = Figure(
            f"API answers, {what}",
            stats.describe(),
            "200 or 503",
            stats.calls > 0 and set(stats.by_status) <= {200, 503},
        )
    return [slowest, errors]


# ------------------------------------------------------------------------------ services


@dataclass(frozen=True)
class KillServices:
    """kill -9 each service once, waiting for the supervisor to bring it back healthy."""

    services: tuple[str, ...] = SERVICES
    label: str = "kill -9 every service"

    @property
    def name(self) -> str:
        return self.label

    async def run(self, chaos: Chaos) -> list[Figure]:
        for service in self.services:
            seconds = await kill_service(chaos, service)
            chaos.kills.setdefault(service, []).append(seconds)
            await asyncio.sleep(SETTLE_SECONDS)
        return []  # one figure per service for the whole run: see kill_figures


async def kill_service(chaos: Chaos, name: str) -> float | None:
    """Seconds from SIGKILL until the service runs again and is healthy; None: not back."""
    before = chaos.service(name)
    pid = before["pid"]
    if pid is None:
        raise ChaosError(f"{name} is not running ({before['state']}): nothing to kill")
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    log(f"kill -9 {name} (pid {pid})")

    async def back() -> bool | None:
        now = chaos.service(name)
        restarted = now["restarts"] > before["restarts"] and now["state"] == "running"
        return True if restarted and await chaos.healthy(name) else None

    try:
        await eventually(back, what=f"{name} restarted", within=RECOVERY_SECONDS)
    except ChaosError as exc:
        log(f"  {exc}")
        if name == "gateway":
            chaos.gateway_kills.append((started, time.monotonic()))
        return None
    seconds = time.monotonic() - started
    log(f"  {name} healthy again after {seconds:.1f} s")
    if name == "gateway":
        chaos.gateway_kills.append((started, started + seconds))
    return seconds


def kill_figures(chaos: Chaos) -> list[Figure]:
    figures = []
    for name, results in chaos.kills.items():
        back = [s for s in results if s is not None]
        value = f"{len(results)} kills, back in " + "/".join(f"{s:.1f}" for s in back) + " s"
        missing = len(results) - len(back)
        if missing:
            value += f", {missing} never back"
        figures.append(
            Figure(f"kill -9 {name}", value, f"back within {RECOVERY_SECONDS:g} s", not missing)
        )
    return figures


# --------------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class RedisOutage:
    """Redis frozen (SIGSTOP) under API load: it accepts connections and never answers."""

    seconds: float

    @property
    def name(self) -> str:
        return f"Redis frozen (SIGSTOP) {self.seconds:g} s"

    async def run(self, chaos: Chaos) -> list[Figure]:
        paths = redis.locate(chaos.layout)
        pid = live_pid(paths.pid, paths.markers)
        if pid is None:
            raise ChaosError("the private Redis is not running")
        log(f"SIGSTOP redis (pid {pid}) for {self.seconds:g} s")
        started = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(self.seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
        ended = time.monotonic()
        log("SIGCONT redis")
        await asyncio.sleep(AFTER_FAULT_SECONDS)
        return _calls_figures(chaos, self.name, (started, ended), postgres_away=False)


WARM_TARGET_SHARE = 0.9
WARM_TARGET_SECONDS = 60.0
WARM_LIMIT_SECONDS = 180.0  # sampling goes on past the target to say when it got there
WARM_SAMPLE_SECONDS = 1.0
# One second holds some 17 lookups of the load (its history calls read PostgreSQL only), so
# one miss would swing a one-second rate by 6 %: the rate is taken over the last 5 samples.
WARM_WINDOW_SAMPLES = 5
CACHE_KINDS = ("token", "velocity", "list")
# The target is on the per-token keys, which warming restores. List pages are dropped by every
# new snapshot, which the replay brings every 0.3 s instead of every 60 s: under it they miss
# nearly always, before the fault as after (~9 % of the load's lookups), and are only shown.
WARMED_KINDS = ("token", "velocity")


def _percent(share: float | None) -> str:
    return "no lookups" if share is None else f"{100 * share:.1f} %"


@dataclass(frozen=True)
class CacheCounts:
    """The gateway's cache-aside lookups so far (its own counters), at ``at``."""

    at: float  # time.monotonic()
    hits: dict[str, float]  # by kind (CACHE_KINDS)
    misses: dict[str, float]
    memory_hits: float  # of the hits: answered from process memory, not Redis

    def since(self, earlier: CacheCounts) -> CacheCounts:
        return CacheCounts(
            self.at - earlier.at,
            {kind: self.hits[kind] - earlier.hits[kind] for kind in CACHE_KINDS},
            {kind: self.misses[kind] - earlier.misses[kind] for kind in CACHE_KINDS},
            self.memory_hits - earlier.memory_hits,
        )

    def share(self, kinds: Sequence[str] = WARMED_KINDS) -> float | None:
        hits = sum(self.hits[kind] for kind in kinds)
        lookups = hits + sum(self.misses[kind] for kind in kinds)
        return hits / lookups if lookups else None

    def describe(self) -> str:
        kinds = ", ".join(
            f"{kind} {self.hits[kind]:g}/{self.hits[kind] + self.misses[kind]:g}"
            for kind in CACHE_KINDS
        )
        return (
            f"{_percent(self.share())} ({kinds} hits/lookups, all kinds "
            f"{_percent(self.share(CACHE_KINDS))}; {self.memory_hits:g} hits from process memory)"
        )


async def cache_counts(chaos: Chaos) -> CacheCounts | None:
    at = time.monotonic()
    samples = await chaos.metric_samples(chaos.ports.gateway)
    if samples is None:
        return None
    lookups = [s for s in samples if s.name == "gateway_cache_lookups_total"]

    def total(kind: str, result: str) -> float:
        return sum(
            s.value
            for s in lookups
            if s.labels.get("kind") == kind and s.labels.get("result") == result
        )

    return CacheCounts(
        at,
        hits={kind: total(kind, "hit") for kind in CACHE_KINDS},
        misses={kind: total(kind, "miss") for kind in CACHE_KINDS},
        memory_hits=sum(s.value for s in samples if s.name == "gateway_memory_cache_hits_total"),
    )


@dataclass(frozen=True)
class WarmingSeen:
    """The gateway's hit rate, over the last WARM_WINDOW_SAMPLES seconds, after a restart."""

    reached: float | None  # seconds until it was WARM_TARGET_SHARE or more
    at_target: CacheCounts | None  # the window ending WARM_TARGET_SECONDS after


async def watch_warming(chaos: Chaos, back: float) -> WarmingSeen:
    """Sample the gateway's counters every second from ``back`` on, until both are known (or
    WARM_LIMIT_SECONDS)."""
    counts: list[CacheCounts] = []
    reached: float | None = None
    at_target: CacheCounts | None = None
    ticks = 0
    while time.monotonic() - back < WARM_LIMIT_SECONDS:
        ticks += 1
        sample = await cache_counts(chaos)
        if sample is not None:
            counts.append(sample)
        if len(counts) > WARM_WINDOW_SAMPLES:
            window = counts[-1].since(counts[-1 - WARM_WINDOW_SAMPLES])
            after = counts[-1].at - back
            share = window.share()
            log(f"  {after:5.1f} s: {window.describe()}")
            if reached is None and share is not None and share >= WARM_TARGET_SHARE:
                reached = after
            if at_target is None and after >= WARM_TARGET_SECONDS:
                at_target = window
            if at_target is not None and reached is not None:
                break
        await asyncio.sleep(max(0.0, back + ticks * WARM_SAMPLE_SECONDS - time.monotonic()))
    return WarmingSeen(reached, at_target)


@dataclass(frozen=True)
class RedisRestart:
    """Redis stopped, its data wiped (the worst case: the append-only file lost), started
    again under API load; then how fast the cache warms back up: the writer rewrites the top
    tokens when it sees Redis restarted, the gateway's cache-aside reads fill in the rest.
    The figures are the gateway's cache hit rate over the last seconds, from its /metrics."""

    @property
    def name(self) -> str:
        return "Redis restarted with its data wiped"

    async def run(self, chaos: Chaos) -> list[Figure]:
        paths = redis.locate(chaos.layout)
        warm_runs = "tokvel_cache_warm_runs_total"
        warmed_before = await chaos.metric_sum(chaos.ports.writer_ops, warm_runs)
        first = await cache_counts(chaos)
        await asyncio.sleep(WARM_WINDOW_SAMPLES * WARM_SAMPLE_SECONDS)
        last = await cache_counts(chaos)
        before = None if first is None or last is None else last.since(first)
        log(f"  hit rate before: {'unknown' if before is None else before.describe()}")
        log(f"stopping Redis, wiping {paths.data}")
        await asyncio.to_thread(redis.down, chaos.layout)
        await asyncio.to_thread(shutil.rmtree, paths.data)
        taken = await start_again(lambda: redis.up(chaos.layout), [paths.log], "Redis")
        back = time.monotonic()
        log(f"  Redis back, empty ({taken} times its port was taken)")
        seen = await watch_warming(chaos, back)
        warmed = (await chaos.metric_sum(chaos.ports.writer_ops, warm_runs) or 0) - (
            warmed_before or 0
        )
        log(f"  writer warm-ups meanwhile: {warmed:g}")
        target = f"≥ {100 * WARM_TARGET_SHARE:g} %"
        share_at_target = None if seen.at_target is None else seen.at_target.share()
        what = "token and velocity cache hit rate"
        return [
            Figure(
                f"{what} before Redis restarted empty",
                "unknown" if before is None else before.describe(),
                "-",
                True,
            ),
            Figure(
                f"{what} {target} after Redis restarted empty",
                "never" if seen.reached is None else f"after {seen.reached:.1f} s",
                f"≤ {WARM_TARGET_SECONDS:g} s",
                seen.reached is not None and seen.reached <= WARM_TARGET_SECONDS,
            ),
            Figure(
                f"{what} {WARM_TARGET_SECONDS:g} s after Redis restarted empty",
                "unknown" if seen.at_target is None else seen.at_target.describe(),
                target,
                share_at_target is not None and share_at_target >= WARM_TARGET_SHARE,
            ),
            Figure(
                "writer warm-ups after Redis restarted empty", f"{warmed:g}", "≥ 1", warmed >= 1
            ),
        ]


# ---------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PostgresOutage:
    """PostgreSQL stopped (fast shutdown) for a while, other faults meanwhile; then how long
    the writer takes to store what piled up in Kafka."""

    seconds: float
    meanwhile: Step | None = None

    @property
    def name(self) -> str:
        return f"PostgreSQL stopped {self.seconds:g} s"

    async def run(self, chaos: Chaos) -> list[Figure]:
        node = cluster_of(chaos.layout).primary()
        log(f"stopping PostgreSQL ({node.name}) for {self.seconds:g} s")
        started = time.monotonic()
        await asyncio.to_thread(postgres.stop, node)
        try:
            if self.meanwhile is not None:
                log(f"meanwhile: {self.meanwhile.name}")
                await self.meanwhile.run(chaos)
            await asyncio.sleep(max(0.0, started + self.seconds - time.monotonic()))
        finally:
            ended = time.monotonic()
            taken = await start_again(lambda: pg_cluster.up(chaos.layout), [node.log], "PostgreSQL")
        back = time.monotonic()
        log(f"PostgreSQL back after {back - started:.1f} s ({taken} times its port was taken)")
        ends = await chaos.end_offsets(METRICS)
        backlog = await chaos.writer_behind(ends)
        log(f"  writer backlog: {backlog} messages of token.metrics")

        async def drained() -> bool | None:
            return True if await chaos.writer_behind(ends) == 0 else None

        try:
            await eventually(drained, what="the backlog stored", within=DRAIN_LIMIT_SECONDS)
            drain = time.monotonic() - back
            value = f"{drain:.1f} s for {backlog} samples"
        except ChaosError:
            drain = None
            value = f"not within {DRAIN_LIMIT_SECONDS:g} s"
        log(f"  backlog drained: {value}")
        return [
            Figure(
                "backlog drained after PostgreSQL returned",
                value,
                f"≤ {DRAIN_TARGET_SECONDS:g} s",
                drain is not None and drain <= DRAIN_TARGET_SECONDS,
            ),
            *_calls_figures(chaos, self.name, (started, ended), postgres_away=True),
        ]


# --------------------------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class KafkaRestart:
    """The broker stopped (SIGTERM: controlled shutdown, or SIGKILL) and started again."""

    how: signal.Signals
    down_seconds: float = 10.0

    @property
    def name(self) -> str:
        return f"Kafka broker restart ({self.how.name})"

    async def run(self, chaos: Chaos) -> list[Figure]:
        paths = kafka.locate(chaos.layout)
        pid = live_pid(paths.pid, paths.markers)
        if pid is None:
            raise ChaosError("the private Kafka broker is not running")
        log(f"{self.name}: pid {pid}")
        started = time.monotonic()
        if self.how == signal.SIGTERM:
            await asyncio.to_thread(kafka.down, chaos.layout)
        else:
            os.kill(pid, self.how)
            await asyncio.to_thread(wait_gone, pid, 60.0)
        await asyncio.sleep(self.down_seconds)

        def start() -> None:
            restarting = time.monotonic()
            new_pid, state = kafka.start(chaos.layout)
            kafka.wait_ready(chaos.layout, new_pid, state, restarting)

        taken = await start_again(start, [paths.stdout_log], "Kafka")
        back = time.monotonic()
        log(f"  broker back after {back - started:.1f} s ({taken} times its port was taken)")
        flowing = await chaos.rows_growing(within=PIPELINE_SECONDS)
        if flowing is None and (await chaos.replay_state()).get("exhausted"):
            # Nothing new to write: the pipeline must then have caught up instead.
            ends = await chaos.end_offsets(METRICS)
            caught_up = await chaos.writer_behind(ends) == 0
            value = "replay over; writer caught up" if caught_up else "replay over; writer behind"
            met = caught_up
        else:
            value = f"broker away {back - started:.1f} s; rows again " + (
                f"{flowing:.1f} s after" if flowing is not None else "never"
            )
            met = flowing is not None
        log(f"  {value}")
        return [Figure(self.name, value, f"rows again within {PIPELINE_SECONDS:g} s", met)]


# ------------------------------------------------------------------------------- network


@dataclass(frozen=True)
class NetworkFault:
    """The network to PostgreSQL or Redis drops every packet for a while (a blackholed proxy):
    every call to it must give up by its timeout, and the stack must carry on afterwards."""

    target: str  # "postgres" or "redis"
    seconds: float

    @property
    def label(self) -> str:
        return "PostgreSQL" if self.target == "postgres" else "Redis"

    @property
    def name(self) -> str:
        return f"{self.label} unreachable (packets dropped) {self.seconds:g} s"

    async def run(self, chaos: Chaos) -> list[Figure]:
        proxy = chaos.postgres_proxy if self.target == "postgres" else chaos.redis_proxy
        failures_metric = "tokvel_writer_batch_failures_total"
        failures_before = await chaos.metric_sum(chaos.ports.writer_ops, failures_metric)
        log(self.name)
        started = time.monotonic()
        proxy.blackhole()
        try:
            await asyncio.sleep(self.seconds)
            failures_after = await chaos.metric_sum(chaos.ports.writer_ops, failures_metric)
        finally:
            proxy.heal()
        ended = time.monotonic()
        log("  network healed")
        await asyncio.sleep(AFTER_FAULT_SECONDS)
        window = (started, ended)
        figures = _calls_figures(chaos, self.name, window, postgres_away=self.target == "postgres")
        if self.target == "postgres":
            gave_up = (failures_after or 0) - (failures_before or 0)
            figures.append(
                Figure(
                    "writer writes given up, PostgreSQL unreachable",
                    f"{gave_up:g}",
                    "≥ 1 (timed out, not hung)",
                    gave_up >= 1,
                )
            )
        flowing = await chaos.rows_growing(within=PIPELINE_SECONDS)
        figures.append(
            Figure(
                f"rows written again after {self.label} reachable again",
                "never" if flowing is None else _seconds(flowing),
                f"≤ {PIPELINE_SECONDS:g} s",
                flowing is not None,
            )
        )
        return figures
