"""The pure parts of ``tokvel infra``: paths, generated configs, checks; nothing is started."""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tokvel_common import localstack
from tokvel_common.infra import kafka, postgres, redis, system
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.process import InfraError
from tokvel_common.infra.stack import env_lines
from tokvel_common.paths import PROJECT_ROOT


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A scratch dir every user may traverse (pytest's own tmp_path sits under a 0700 dir)."""
    path = Path(tempfile.mkdtemp(prefix="tokvel-infra-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _layout(tmp_path: Path) -> Layout:
    return Layout.from_environment(
        {"TOKVEL_RUN_DIR": str(tmp_path / "run"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    )


def test_env_lines_are_the_local_stack_settings() -> None:
    assert env_lines() == [
        f"KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{localstack.KAFKA_PORT}",
        f"DATABASE_URL={localstack.DATABASE_URL}",
        f"REDIS_URL={localstack.REDIS_URL}",
    ]


def test_layout_defaults_and_overrides(tmp_path: Path) -> None:
    default = Layout.from_environment({"HOME": str(tmp_path)})
    assert default.run_dir == PROJECT_ROOT / ".run"
    custom = _layout(tmp_path)
    assert custom.run_dir == tmp_path / "run"
    assert custom.cache_dir == tmp_path / "cache" / "tokvel"
    assert kafka.locate(custom).jars == tmp_path / "cache/tokvel/kafka-4.1.1/libs"
    # One fallback dir per run dir, stable across calls.
    assert custom.fallback_dir == _layout(tmp_path).fallback_dir != default.fallback_dir
    assert custom.fallback_dir.parent == Path("/var/tmp")


def test_first_blocked_finds_a_private_directory(open_tmp: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    private = open_tmp / "private"
    (private / "deeper").mkdir(parents=True)
    private.chmod(0o700)
    assert system.first_blocked(private / "deeper" / "not-yet", nobody) == private
    private.chmod(0o755)
    assert system.first_blocked(private / "deeper", nobody) is None


def test_postgres_moves_out_of_an_unreachable_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = _layout(tmp_path)
    nobody = pwd.getpwnam("nobody")
    monkeypatch.setattr(postgres, "is_root", lambda: True)
    monkeypatch.setattr(postgres, "first_blocked", lambda path, user: tmp_path)
    monkeypatch.setattr(pwd, "getpwnam", lambda name: nobody)
    located = postgres.locate(layout)
    assert located.home == layout.fallback_dir / "postgres"
    assert located.fallback_reason is not None and str(tmp_path) in located.fallback_reason


def test_postgres_stays_in_a_reachable_run_dir(open_tmp: Path) -> None:
    layout = _layout(open_tmp)
    assert postgres.locate(layout) == postgres.PgPaths(layout.run_dir / "postgres", None)


def test_postgres_avoids_a_socket_path_too_long(open_tmp: Path) -> None:
    deep = open_tmp / ("d" * 100)
    layout = Layout.from_environment({"TOKVEL_RUN_DIR": str(deep)})
    located = postgres.locate(layout)
    assert located.home == layout.fallback_dir / "postgres"
    assert len(str(located.socket_dir / postgres.SOCKET_NAME)) <= postgres.MAX_SOCKET_PATH


def test_kafka_runs_as_one_kraft_node(tmp_path: Path) -> None:
    paths = kafka.locate(_layout(tmp_path))
    props = dict(
        line.split("=", 1) for line in kafka.server_properties(paths).splitlines() if "=" in line
    )
    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:29093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert props["num.partitions"] == "6"
    assert props["auto.create.topics.enable"] == "true"
    assert props["log.dirs"] == str(paths.data)


def test_kafka_cluster_ids_look_like_kafkas() -> None:
    for _ in range(200):
        cluster_id = kafka._cluster_id()
        assert len(cluster_id) == 22 and not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_kafka_pom_pins_the_version_the_code_expects() -> None:
    pom = (PROJECT_ROOT / "infra" / "kafka" / "pom.xml").read_text(encoding="utf-8")
    assert f"<kafka.version>{kafka.KAFKA_VERSION}</kafka.version>" in pom
    assert "<artifactId>log4j-slf4j-impl</artifactId>" in pom
    assert (PROJECT_ROOT / "infra" / "kafka" / "log4j2.xml").is_file()


def test_jar_cache_is_complete_only_with_a_matching_stamp(tmp_path: Path) -> None:
    paths = kafka.locate(_layout(tmp_path))
    assert not kafka.jars_complete(paths)
    paths.jars.mkdir(parents=True)
    paths.stamp.write_text("not the pom's digest\n", encoding="ascii")
    assert not kafka.jars_complete(paths)
    paths.stamp.write_text(kafka._pom_digest(paths) + "\n", encoding="ascii")
    assert kafka.jars_complete(paths)


def test_redis_persists_with_an_every_second_aof(tmp_path: Path) -> None:
    paths = redis.locate(_layout(tmp_path))
    settings = dict(line.split(" ", 1) for line in redis.config(paths).splitlines()[1:])
    assert settings["bind"] == "127.0.0.1"
    assert settings["port"] == str(localstack.REDIS_PORT)
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["pidfile"] == str(paths.pid)
    assert settings["logfile"] == str(paths.log)
    assert settings["dir"] == str(paths.data)


def test_missing_packages_without_root_name_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        system, "NEEDS", (system.Need("Redis 7 (redis-server)", "redis-server", lambda: False),)
    )
    monkeypatch.setattr(system, "is_root", lambda: False)
    with pytest.raises(InfraError, match="apt-get install -y --no-install-recommends redis-server"):
        system.ensure_packages(tmp_path / "apt.log")
    assert not (tmp_path / "apt.log").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback only matters for root")
def test_root_cannot_be_the_postgres_user() -> None:
    assert system.PG_SYSTEM_USER != "root"
