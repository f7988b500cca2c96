"""The pure parts of backups and failover: the schedule, retention, configs, options, DSNs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tokvel_common.infra.backups import Step, expired_incrementals, plan
from tokvel_common.infra.layout import Layout
from tokvel_common.infra.pg_cluster import (
    APPLICATION_NAME,
    PgCluster,
    cluster_of,
    settings_for,
    slot_name,
)
from tokvel_common.infra.pgbackrest import (
    BackupInfo,
    BackupKind,
    BackupSettings,
    archive_command,
    config,
)
from tokvel_common.infra.postgres import PgPaths

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SETTINGS = BackupSettings()


def _backup(
    label: str, kind: BackupKind, repo: int, age: timedelta, prior: str | None
) -> BackupInfo:
    started = NOW - age
    return BackupInfo(label, kind, repo, started, started + timedelta(minutes=1), prior)


def _day(repo: int, hours_ago: int, incrementals: int) -> list[BackupInfo]:
    """A full ``hours_ago`` hours before NOW and its hourly incrementals."""
    full = _backup(f"h{hours_ago}F-r{repo}", "full", repo, timedelta(hours=hours_ago), None)
    chain = [full]
    for hour in range(1, incrementals + 1):
        age = timedelta(hours=hours_ago - hour)
        chain.append(_backup(f"h{hours_ago}I{hour}-r{repo}", "incr", repo, age, chain[-1].label))
    return chain


def test_a_repository_without_backups_gets_a_full_one_now() -> None:
    assert plan([], NOW, SETTINGS) == [
        Step("backup", 1, kind="full"),
        Step("backup", 2, kind="full"),
    ]


def test_a_full_a_day_after_the_last_and_incrementals_hourly_in_between() -> None:
    fresh = _backup("f1", "full", 1, timedelta(minutes=30), None)
    hour_old = _backup("f2", "full", 2, timedelta(hours=1), None)
    assert plan([fresh, hour_old], NOW, SETTINGS) == [Step("backup", 2, kind="incr")]
    day_old = _backup("f3", "full", 1, timedelta(hours=24), None)
    recent_incr = _backup("i3", "incr", 1, timedelta(minutes=5), "f3")
    # The newest incremental is recent, but the full is due regardless.
    assert Step("backup", 1, kind="full") in plan([day_old, recent_incr], NOW, SETTINGS)


def test_incrementals_expire_a_whole_chain_once_its_newest_is_past_seven_days() -> None:
    old_chain = _day(1, 9 * 24, 23)  # newest incremental 8 days and 1 hour old
    straddling = _day(1, 7 * 24 + 12, 23)  # first incremental 7 d 11 h old, newest 6 d 13 h
    young_chain = _day(1, 6 * 24, 23)
    backups = [*old_chain, *straddling, *young_chain]
    keep = timedelta(days=7)
    # A chain goes whole (each incremental depends on the one before), so only once its newest
    # is past the retention: the straddling one stays until then.
    assert expired_incrementals(backups, NOW, keep) == ["h216I1-r1"]
    later = NOW + timedelta(hours=12)
    assert expired_incrementals(backups, later, keep) == ["h216I1-r1", "h180I1-r1"]


def test_the_plan_expires_per_repository() -> None:
    backups = [
        *_day(1, 9 * 24, 2),
        *_day(2, 3 * 24, 2),
        _backup("now", "full", 1, timedelta(0), None),
    ]
    steps = plan(backups, NOW, SETTINGS)
    assert Step("expire", 1, label="h216I1-r1") in steps
    assert not any(s.action == "expire" and s.repo == 2 for s in steps)


def _cluster(tmp_path: Path, *, backups: bool, standby: bool) -> PgCluster:
    first = PgPaths(tmp_path / "postgres", None, port=45432)
    return PgCluster(first, tmp_path, backups=backups, standby=standby)


def test_pgbackrest_config_has_two_repositories_with_time_retention(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, backups=True, standby=True)
    text = config(cluster.backrest, cluster.nodes, SETTINGS)
    lines = set(text.splitlines())
    for repo in (1, 2):
        assert f"repo{repo}-path={cluster.backrest.repo(repo)}" in lines
        assert f"repo{repo}-retention-full-type=time" in lines
        assert f"repo{repo}-retention-full=30" in lines
    assert {"archive-async=y", f"spool-path={cluster.backrest.spool}"} <= lines
    assert f"pg1-port={cluster.first.port}" in lines
    assert f"pg2-path={cluster.second.data}" in lines
    assert f"pg2-port={cluster.first.port + 1}" in lines


def test_each_node_archives_with_its_own_data_dir(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, backups=True, standby=True)
    for node in cluster.nodes:
        command = archive_command(cluster.backrest, node)
        assert f"--pg1-path={node.data}" in command
        assert command.endswith(" archive-push %p")
        settings = settings_for(cluster, node, follow=None, sync=False)
        assert settings["archive_mode"] == "on"
        assert settings["archive_timeout"] == "'60s'"


def test_roles_set_replication_settings(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, backups=False, standby=True)
    primary, standby = cluster.first, cluster.second
    assert settings_for(cluster, primary, follow=None, sync=False) == {}
    assert settings_for(cluster, primary, follow=None, sync=True) == {
        "synchronous_standby_names": f"'{APPLICATION_NAME}'"
    }
    following = settings_for(cluster, standby, follow=primary, sync=False)
    assert f"port={primary.port}" in following["primary_conninfo"]
    assert f"application_name={APPLICATION_NAME}" in following["primary_conninfo"]
    assert following["primary_slot_name"] == f"'{slot_name(standby)}'"
    assert slot_name(standby) == "tokvel_postgresql_b"


def test_the_standby_lives_in_the_first_nodes_home_on_the_next_port(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, backups=False, standby=True)
    assert cluster.second.home == cluster.first.home / "node-b"
    assert cluster.second.port == cluster.first.port + 1
    assert cluster.second.markers != cluster.first.markers


def test_services_get_every_node_and_keep_the_writable_one(tmp_path: Path) -> None:
    single = _cluster(tmp_path, backups=False, standby=False)
    assert single.database_url() == "postgresql://tokvel:tokvel@127.0.0.1:45432/tokvel"
    pair = _cluster(tmp_path, backups=False, standby=True)
    assert pair.database_url("other") == (
        "postgresql://tokvel:tokvel@127.0.0.1:45432,127.0.0.1:45433/other"
        "?target_session_attrs=read-write"
    )


def test_options_are_sticky_unless_set(tmp_path: Path) -> None:
    layout = Layout.from_environment({"TOKVEL_RUN_DIR": str(tmp_path / "run")})
    assert cluster_of(layout, {}).backups is False
    assert cluster_of(layout, {"TOKVEL_PG_BACKUPS": "1"}).backups is True
    first = cluster_of(layout, {})
    first.backrest.root.mkdir(parents=True)
    first.backrest.conf.write_text("[global]\n")
    assert cluster_of(layout, {}).backups is True  # already has backups: they stay on
    assert cluster_of(layout, {"TOKVEL_PG_BACKUPS": "0"}).backups is False
    (first.second.data).mkdir(parents=True)
    (first.second.data / "PG_VERSION").write_text("15\n")
    assert cluster_of(layout, {}).standby is True


def test_the_primary_is_what_roles_json_says(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, backups=False, standby=True)
    assert cluster.primary() == cluster.first and cluster.replica() == cluster.second
    cluster.home.mkdir(parents=True)
    cluster.roles_file.write_text('{"primary": "postgresql-b"}')
    assert cluster.primary() == cluster.second and cluster.replica() == cluster.first
