"""Kafka 4.1.1: one KRaft node (broker and controller) on 127.0.0.1, jars from Maven Central.

The jars come from ``infra/kafka/pom.xml`` through ``mvn dependency:copy-dependencies`` into
``$XDG_CACHE_HOME/tokvel/kafka-<version>/libs`` (default ``~/.cache``), once: a stamp file
holding the pom's SHA-256 marks the copy complete, so an interrupted download or an edited pom
fetches again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from tokvel_common import localstack
from tokvel_common.infra.component import ComponentStatus
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.process import (
    LOOPBACK,
    InfraError,
    adopt,
    live_pid,
    port_open,
    run,
    say,
    spawn_detached,
    stopwatch,
    terminate,
    wait_until,
)
from tokvel_common.infra.system import java_binary
from tokvel_common.topics import TOPICS, TopicSpec

NAME = "kafka"
KAFKA_VERSION = "4.1.1"  # must match infra/kafka/pom.xml
BOOTSTRAP = f"{LOOPBACK}:{localstack.KAFKA_PORT}"
CONTROLLER = f"{LOOPBACK}:{localstack.KAFKA_CONTROLLER_PORT}"
HEAP = ("-Xms256m", "-Xmx768m")
STARTUP_TIMEOUT = 180.0  # a cold JVM on a 2-core machine, plus metadata log replay
STOP_TIMEOUT = 60.0  # controlled shutdown flushes and closes every log segment
TOPIC_ALREADY_EXISTS = 36  # Kafka protocol error code


@dataclass(frozen=True)
class KafkaPaths:
    home: Path  # <run>/kafka: config, data, logs
    pid: Path
    stdout_log: Path
    jars: Path
    pom: Path
    log4j: Path

    @property
    def config(self) -> Path:
        return self.home / "server.properties"

    @property
    def data(self) -> Path:
        return self.home / "data"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def stamp(self) -> Path:
        return self.jars / ".complete"

    @property
    def markers(self) -> tuple[str, ...]:
        return ("kafka.Kafka", str(self.config))


def locate(layout: Layout) -> KafkaPaths:
    return KafkaPaths(
        home=layout.run_dir / "kafka",
        pid=layout.run_dir / "kafka.pid",
        stdout_log=layout.run_dir / "kafka.log",
        jars=layout.cache_dir / f"kafka-{KAFKA_VERSION}" / "libs",
        pom=layout.project_root / "infra" / "kafka" / "pom.xml",
        log4j=layout.project_root / "infra" / "kafka" / "log4j2.xml",
    )


# --- jars ------------------------------------------------------------------------------------


def _pom_digest(paths: KafkaPaths) -> str:
    return hashlib.sha256(paths.pom.read_bytes()).hexdigest()


def jars_complete(paths: KafkaPaths) -> bool:
    try:
        return paths.stamp.read_text(encoding="ascii").strip() == _pom_digest(paths)
    except OSError:
        return False


def ensure_jars(paths: KafkaPaths) -> None:
    """Fetch the broker's classpath once; later runs only compare the stamp."""
    if jars_complete(paths):
        return
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError("mvn not found")
    say(f"  {NAME}: fetching Kafka {KAFKA_VERSION} jars from Maven Central into {paths.jars}")
    # Into a sibling first and renamed at the end: a half-filled libs/ never looks complete.
    staging = paths.jars.with_name(paths.jars.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with stopwatch() as elapsed:
        run(
            [
                mvn,
                "-q",
                "-B",
                "-f",
                str(paths.pom),
                "dependency:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={staging}",
            ],
            what="mvn dependency:copy-dependencies",
            timeout=900,
            cwd=paths.pom.parent,
        )
        if not any(staging.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
            raise InfraError(f"{NAME}: Maven finished but {staging} holds no Kafka jar")
        (staging / ".complete").write_text(_pom_digest(paths) + "\n", encoding="ascii")
        shutil.rmtree(paths.jars, ignore_errors=True)
        staging.rename(paths.jars)
    count = len(list(paths.jars.glob("*.jar")))
    say(f"  {NAME}: {count} jars fetched ({elapsed():.1f}s)")


# --- process ---------------------------------------------------------------------------------


def server_properties(paths: KafkaPaths) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": CONTROLLER,
        "listeners": f"PLAINTEXT://{BOOTSTRAP},CONTROLLER://{CONTROLLER}",
        "advertised.listeners": f"PLAINTEXT://{BOOTSTRAP}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(paths.data),
        # One node: every internal topic with a single replica, or they are never created.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        # Consumers join at once instead of after the 3 s default: tests and demos start fast.
        "group.initial.rebalance.delay.ms": "0",
        "num.partitions": "6",
        # Faust creates its own changelog and repartition topics.
        "auto.create.topics.enable": "true",
        "num.network.threads": "3",
        "num.io.threads": "4",
        "log.retention.hours": "168",
        "log.retention.check.interval.ms": "300000",
    }
    header = "# Written by `tokvel infra up` on every start: edit infra/kafka.py instead.\n"
    return header + "".join(f"{key}={value}\n" for key, value in settings.items())


def _java_argv(paths: KafkaPaths, main: str, heap: Iterable[str], *args: str) -> list[str]:
    java = java_binary()
    if java is None:
        raise InfraError("java not found")
    return [
        str(java),
        *heap,
        "-XX:+ExitOnOutOfMemoryError",
        f"-XX:ErrorFile={paths.logs}/hs_err_pid%p.log",
        "-Djava.awt.headless=true",
        # Without its own configuration file log4j2 logs ERROR and above only.
        f"-Dlog4j2.configurationFile={paths.log4j}",
        f"-Dkafka.logs.dir={paths.logs}",
        "-cp",
        f"{paths.jars}/*",  # expanded by the JVM itself, not by a shell
        main,
        *args,
    ]


def _cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding (Uuid.randomUuid)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not text.startswith("-"):  # Kafka rejects ids that look like a command-line flag
            return text


def _format_storage(paths: KafkaPaths) -> None:
    """Format the log dir once: a formatted dir has meta.properties and keeps its cluster id."""
    if (paths.data / "meta.properties").exists():
        return
    paths.data.mkdir(parents=True, exist_ok=True)
    argv = _java_argv(paths, "kafka.tools.StorageTool", ("-Xmx256m",))
    argv += ["format", "--standalone", "-t", _cluster_id(), "-c", str(paths.config)]
    run(argv, what="kafka-storage format", timeout=120)
    say(f"  {NAME}: formatted {paths.data} (single-node KRaft quorum)")


def _start(paths: KafkaPaths) -> int:
    for port in (localstack.KAFKA_PORT, localstack.KAFKA_CONTROLLER_PORT):
        if port_open(port):
            raise InfraError(f"{NAME}: port {port} is taken by a process we did not start")
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(server_properties(paths), encoding="utf-8")
    _format_storage(paths)
    argv = _java_argv(paths, "kafka.Kafka", HEAP, str(paths.config))
    return spawn_detached(argv, log_path=paths.stdout_log, pid_path=paths.pid)


# --- admin -----------------------------------------------------------------------------------


def new_admin() -> Any:
    return AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP, request_timeout_ms=10_000)


async def _metadata_ok() -> bool:
    """The broker answers a metadata request and lists itself."""
    admin = new_admin()
    try:
        await admin.start()
        cluster = await admin.describe_cluster()
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()
    return bool(cluster.get("brokers"))


def metadata_ok() -> bool:
    return port_open(localstack.KAFKA_PORT) and asyncio.run(_metadata_ok())


async def topic_configs(admin: Any, names: list[str]) -> dict[str, dict[str, str]]:
    """The effective configuration of each topic, as DescribeConfigs reports it."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            if resource["error_code"]:
                raise InfraError(f"describe configs {resource['resource_name']}: {resource}")
            configs[resource["resource_name"]] = {
                entry["config_names"]: entry["config_value"] for entry in resource["config_entries"]
            }
    return configs


async def _create_missing(admin: Any, specs: list[TopicSpec]) -> None:
    topics = [
        NewTopic(spec.name, spec.partitions, replication_factor=1, topic_configs=spec.config)
        for spec in specs
    ]
    response = await admin.create_topics(topics)
    for topic, code, message in response.topic_errors:
        if code not in (0, TOPIC_ALREADY_EXISTS):
            raise InfraError(f"{NAME}: cannot create topic {topic}: error {code} {message}")


async def _align_configs(admin: Any) -> list[str]:
    """Give existing topics the configuration of TOPICS (say, one a client auto-created)."""
    current = await topic_configs(admin, [spec.name for spec in TOPICS])
    drifted = [
        spec
        for spec in TOPICS
        if any(current.get(spec.name, {}).get(k) != v for k, v in spec.config.items())
    ]
    if drifted:
        # AlterConfigs sets a topic's whole override set: exactly the spec's.
        responses = await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.name, s.config) for s in drifted]
        )
        for response in responses:
            for resource in response.to_object()["resources"]:
                if resource["error_code"]:
                    raise InfraError(f"{NAME}: cannot alter topic config: {resource}")
    return [spec.name for spec in drifted]


async def _partitions_ready(admin: Any) -> bool:
    described = await admin.describe_topics([spec.name for spec in TOPICS])
    return all(
        topic["error_code"] == 0
        and topic["partitions"]
        and all(p["leader"] >= 0 for p in topic["partitions"])
        for topic in described
    )


async def _wait_partitions(admin: Any, attempts: int = 150) -> None:
    """New topics get their leaders a moment after CreateTopics returns: poll for them."""
    for _ in range(attempts):
        if await _partitions_ready(admin):
            return
        await asyncio.sleep(0.2)
    raise InfraError(f"{NAME}: topics have no partition leaders after {attempts * 0.2:.0f}s")


async def _ensure_topics() -> str:
    admin = new_admin()
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in TOPICS if spec.name not in existing]
        if missing:
            await _create_missing(admin, missing)
        # Leaders first: DescribeConfigs of a topic created a moment ago can still answer
        # UNKNOWN_TOPIC_OR_PARTITION until the broker's metadata has it.
        await _wait_partitions(admin)
        aligned = await _align_configs(admin)
        for topic in await admin.describe_topics([spec.name for spec in TOPICS]):
            spec = next(s for s in TOPICS if s.name == topic["topic"])
            if len(topic["partitions"]) != spec.partitions:
                say(
                    f"  {NAME}: warning: topic {spec.name} has {len(topic['partitions'])}"
                    f" partitions, the spec says {spec.partitions} (delete it to recreate)"
                )
    finally:
        await admin.close()
    report = f"{len(missing)} created, {len(TOPICS) - len(missing)} present"
    return report + (f", config updated: {', '.join(aligned)}" if aligned else "")


# --- commands --------------------------------------------------------------------------------


def prepare(layout: Layout) -> None:
    ensure_jars(locate(layout))


def start(layout: Layout) -> tuple[int, str]:
    """Start the broker without waiting (it is the slowest: the rest starts meanwhile)."""
    paths = locate(layout)
    pid = adopt(paths.pid, paths.markers)
    if pid is not None:
        return pid, f"already running (pid {pid})"
    pid = _start(paths)
    say(f"  {NAME}: starting (pid {pid})")
    return pid, f"started (pid {pid})"


def wait_ready(layout: Layout, pid: int, state: str, started_at: float) -> None:
    """Wait for metadata, then create the topics; ``started_at`` is when :func:`start` ran."""
    paths = locate(layout)
    wait_until(metadata_ok, what=NAME, timeout=STARTUP_TIMEOUT, pid=pid, log_path=paths.stdout_log)
    topics = asyncio.run(_ensure_topics())
    took = time.monotonic() - started_at
    say(f"  {NAME}: {state}, ready on {BOOTSTRAP} ({took:.1f}s); topics: {topics}")


def down(layout: Layout) -> None:
    paths = locate(layout)
    pid = adopt(paths.pid, paths.markers)
    if pid is None:
        say(f"  {NAME}: not running")
        return
    with stopwatch() as elapsed:
        terminate(pid, name=NAME, timeout=STOP_TIMEOUT)
    paths.pid.unlink(missing_ok=True)
    say(f"  {NAME}: stopped pid {pid} ({elapsed():.1f}s)")


def status(layout: Layout) -> ComponentStatus:
    paths = locate(layout)
    jars = "jars cached" if jars_complete(paths) else "jars not fetched yet"
    return ComponentStatus(
        name=NAME,
        pid=live_pid(paths.pid, paths.markers),
        address=f"{BOOTSTRAP} (controller {CONTROLLER})",
        accepting=port_open(localstack.KAFKA_PORT),
        data_dir=paths.data,
        log=paths.logs / "server.log",
        note=f"{jars} in {paths.jars}; JVM output in {paths.stdout_log}",
    )
