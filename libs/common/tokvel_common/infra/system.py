"""System packages and users the local stack needs, installed on demand on Debian as root."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokvel_common.infra.process import InfraError, run, say, stopwatch

PG_BIN = Path("/usr/lib/postgresql/15/bin")
MIN_JAVA = 17  # Kafka 4.x brokers need Java 17 or later
# Debian's postgresql package creates this user; PostgreSQL refuses to run as root.
PG_SYSTEM_USER = "postgres"


def is_root() -> bool:
    return os.geteuid() == 0


def is_debian() -> bool:
    return Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


def java_binary() -> Path | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return Path(java_home) / "bin" / "java"
    found = shutil.which("java")
    return Path(found) if found else None


def java_major(java: Path) -> int | None:
    """The major version from the JDK's ``release`` file (no JVM start: that costs ~0.1 s)."""
    release = Path(os.path.realpath(java)).parents[1] / "release"
    try:
        text = release.read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r'^JAVA_VERSION="(?:1\.)?(\d+)', text, re.MULTILINE)
    return int(found.group(1)) if found else None


def _java_ok() -> bool:
    java = java_binary()
    if java is None:
        return False
    major = java_major(java)
    return major is None or major >= MIN_JAVA  # unknown layout: let Kafka itself complain


def redis_server_binary() -> Path | None:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )
    return Path(found) if found else None


@dataclass(frozen=True)
class Need:
    what: str
    package: str  # Debian 12 package that provides it
    present: Callable[[], bool]
    optional: bool = False  # installed when we can; its absence stops nothing else


NEEDS: tuple[Need, ...] = (
    Need(f"Java {MIN_JAVA}+ (java)", "openjdk-17-jre-headless", _java_ok),
    Need("Maven (mvn)", "maven", lambda: shutil.which("mvn") is not None),
    Need(
        f"PostgreSQL 15 ({PG_BIN}/initdb)", "postgresql-15", lambda: (PG_BIN / "initdb").is_file()
    ),
    Need("Redis 7 (redis-server)", "redis-server", lambda: redis_server_binary() is not None),
    # Only for WAL archiving and backups (TOKVEL_PG_BACKUPS=1), which say so when it is absent.
    Need(
        "pgBackRest (pgbackrest)",
        "pgbackrest",
        lambda: shutil.which("pgbackrest") is not None,
        optional=True,
    ),
)


def missing_needs() -> list[Need]:
    return [need for need in NEEDS if not need.present()]


def ensure_packages(apt_log: Path) -> None:
    """Install what is missing with apt-get when we can (root on Debian), else say what to do."""
    missing = missing_needs()
    if not (is_root() and is_debian()):
        missing = [need for need in missing if not need.optional]
    if not missing:
        return
    packages = [need.package for need in missing]
    names = ", ".join(need.what for need in missing)
    if not (is_root() and is_debian()):
        raise InfraError(
            f"missing: {names}.\n  Install them, e.g. on Debian/Ubuntu:\n"
            f"    sudo apt-get install -y --no-install-recommends {' '.join(packages)}"
        )
    say(f"  system: installing {' '.join(packages)} with apt-get (log {apt_log})")
    # Non-interactive: a debconf prompt would hang a CI job. Installing postgresql-15 may set
    # up a system cluster on 5432; ours is separate and leaves it alone.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt_log.parent.mkdir(parents=True, exist_ok=True)
    with stopwatch() as elapsed:
        run(["apt-get", "update"], what="apt-get update", timeout=600, env=env, log_path=apt_log)
        run(
            ["apt-get", "install", "-y", "--no-install-recommends", *packages],
            what=f"apt-get install {' '.join(packages)}",
            timeout=1800,
            env=env,
            log_path=apt_log,
        )
    still = missing_needs()
    if still:
        raise InfraError(f"still missing after apt-get: {', '.join(n.what for n in still)}")
    say(f"  system: installed in {elapsed():.1f}s")


def ensure_system_user(name: str = PG_SYSTEM_USER) -> pwd.struct_passwd:
    """The unprivileged account PostgreSQL runs as when we are root; created if absent."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    say(f"  system: creating system user {name!r} to run PostgreSQL (it refuses to run as root)")
    run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/var/lib/postgresql",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ],
        what=f"useradd {name}",
        timeout=60,
    )
    return pwd.getpwnam(name)


def first_blocked(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory from / down to ``path`` that ``user`` may not search, if any.

    Mode bits only (no ACLs), decided the way the kernel does: owner bits for the owner,
    else group bits for a member, else the bits for others. Missing directories are skipped:
    we create them 0755.
    """
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for directory in reversed((path, *path.parents)):
        try:
            info = directory.stat()
        except FileNotFoundError:
            continue
        if info.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif info.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return directory
    return None
