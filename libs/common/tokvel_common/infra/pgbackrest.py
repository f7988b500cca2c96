"""pgBackRest for the local stack: WAL archiving, backups in two repositories, verify, restore.

Everything lives in ``<postgres home>/pgbackrest/``: ``pgbackrest.conf`` (rewritten by every
``tokvel infra up``), the two posix repositories ``repo1`` and ``repo2`` — repo2 stands for the
copy in another region; each holds the whole WAL archive and its own backups, so either one alone
restores the cluster — the async archiving ``spool``, ``log`` and ``lock``.

WAL: every node's ``archive_command`` is ``pgbackrest archive-push`` with ``archive-async``: the
archiver hands a segment to a background process that pushes to both repositories and answers
from the spool, so a slow repository does not hold WAL back. ``archive_timeout`` (60 s) bounds
how old the newest archived WAL may be on an idle cluster: that is the RPO of a restore from the
repositories alone.

Retention, and what pgBackRest can and cannot express. The seed asks for daily full backups kept
30 days and hourly incrementals kept 7 days. pgBackRest counts retention for full backups
(``repo-retention-full``, a number of backups, or days with ``repo-retention-full-type=time``)
and for differentials (``repo-retention-diff``, a number of backups); an **incremental has no
retention of its own**: it lives as long as the full (or differential) it depends on. So "fulls
30 days" is ``repo-retention-full-type=time`` + ``repo-retention-full=30`` below (the WAL archive
is kept back to the oldest retained full, so any point of the last 30 days can be recovered),
and "incrementals 7 days" is enforced by our scheduler (:mod:`backup_scheduler`): once the newest
incremental of a full's chain is 7 days old, it expires the chain's first incremental with
``expire --set``, which takes the rest of the chain with it (each incremental depends on the one
before). Expiring incrementals loses no recovery point: WAL still covers those days, restores of
them only replay more of it.

``python -m tokvel_common.infra.backups`` runs the scheduler and these commands by hand.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import orjson
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokvel_common import localstack
from tokvel_common.infra.postgres import PgPaths, as_owner, conf_string, give, make_dirs
from tokvel_common.infra.process import InfraError, run

STANZA = "tokvel"
REPOS = (1, 2)
# The commands that may write to a repository take the stanza lock; a backup of a small
# cluster takes seconds, of a large one much longer.
BACKUP_TIMEOUT_SECONDS = 3600.0
COMMAND_TIMEOUT_SECONDS = 300.0

BackupKind = Literal["full", "diff", "incr"]


class BackupSettings(BaseSettings):
    """Retention and schedule; environment variables of the same names in upper case."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", case_sensitive=False)

    tokvel_backup_full_retention_days: int = Field(
        default=30, ge=1, description="Full backups kept this many days (pgBackRest's own rule)."
    )
    tokvel_backup_incr_retention_days: float = Field(
        default=7, gt=0, description="Incrementals kept this many days (our scheduler's rule)."
    )
    tokvel_backup_full_interval_hours: float = Field(
        default=24, gt=0, description="A full backup when the newest is this old."
    )
    tokvel_backup_incr_interval_hours: float = Field(
        default=1, gt=0, description="An incremental when the newest backup is this old."
    )
    tokvel_backup_check_seconds: float = Field(
        default=60, gt=0, description="How often the scheduler looks at what is due."
    )


@dataclass(frozen=True)
class BackrestPaths:
    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "pgbackrest.conf"

    def repo(self, number: int) -> Path:
        return self.root / f"repo{number}"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def lock_dir(self) -> Path:
        return self.root / "lock"

    @property
    def configured(self) -> bool:
        return self.conf.exists()

    @property
    def stanza_created(self) -> bool:
        return all(
            (self.repo(n) / "backup" / STANZA / "backup.info").exists()
            and (self.repo(n) / "archive" / STANZA / "archive.info").exists()
            for n in REPOS
        )


@dataclass(frozen=True)
class BackupInfo:
    """One backup as ``pgbackrest info`` reports it."""

    label: str
    kind: BackupKind
    repo: int
    started: datetime
    stopped: datetime
    prior: str | None  # the backup it depends on (None for a full)


def binary() -> str:
    found = shutil.which("pgbackrest") or "/usr/bin/pgbackrest"
    if not Path(found).is_file():
        raise InfraError(
            "pgbackrest not found; on Debian: apt-get install --no-install-recommends pgbackrest"
        )
    return found


def config(paths: BackrestPaths, nodes: Sequence[PgPaths], settings: BackupSettings) -> str:
    """``pgbackrest.conf``: two repositories, async archiving, the nodes as pg1, pg2..."""
    days = settings.tokvel_backup_full_retention_days
    lines = [
        "# Written by `tokvel infra up`: edit libs/common/tokvel_common/infra/pgbackrest.py.",
        "[global]",
    ]
    for number in REPOS:
        lines += [
            f"repo{number}-path={paths.repo(number)}",
            # Fulls kept `days` days; incrementals go with their full, or earlier by our
            # scheduler (see the module docstring).
            f"repo{number}-retention-full-type=time",
            f"repo{number}-retention-full={days}",
        ]
    lines += [
        "archive-async=y",
        f"spool-path={paths.spool}",
        # If both repositories are unreachable for long, drop WAL rather than fill the primary's
        # disk; `pgbackrest check` and `verify` then report the gap.
        "archive-push-queue-max=4GiB",
        "compress-type=lz4",  # fast and light on CPU: the local stack shares 2 cores
        "start-fast=y",  # a backup starts with an immediate checkpoint, not a spread one
        f"log-path={paths.log_dir}",
        f"lock-path={paths.lock_dir}",
        "log-level-console=warn",
        "log-level-file=info",
        "",
        f"[{STANZA}]",
    ]
    for index, node in enumerate(nodes, start=1):
        lines += [
            f"pg{index}-path={node.data}",
            f"pg{index}-port={node.port}",
            f"pg{index}-socket-path={node.socket_dir}",
            f"pg{index}-user={localstack.POSTGRES_USER}",
        ]
    return "\n".join(lines) + "\n"


def prepare(paths: BackrestPaths, nodes: Sequence[PgPaths], settings: BackupSettings) -> None:
    """Create the repositories and dirs (owned by the PostgreSQL user) and write the config."""
    make_dirs(paths.root)
    make_dirs(
        *(paths.repo(n) for n in REPOS), paths.spool, paths.log_dir, paths.lock_dir, mode=0o750
    )
    tmp = paths.conf.with_name(paths.conf.name + ".tmp")
    tmp.write_text(config(paths, nodes, settings), encoding="utf-8")
    give(tmp)
    tmp.replace(paths.conf)


def archive_command(paths: BackrestPaths, node: PgPaths) -> str:
    """The node's ``archive_command``: its own data dir, since either node may be the primary."""
    argv = [
        binary(),
        f"--config={paths.conf}",
        f"--stanza={STANZA}",
        f"--pg1-path={node.data}",
        "archive-push",
    ]
    return shlex.join(argv) + " %p"


def archive_settings(paths: BackrestPaths, node: PgPaths) -> dict[str, str]:
    """The postgresql.conf settings that archive the node's WAL into both repositories."""
    return {
        "archive_mode": "on",
        "archive_timeout": "'60s'",  # the archive is at most a minute behind an idle primary
        "archive_command": conf_string(archive_command(paths, node)),
    }


def command(
    paths: BackrestPaths,
    args: Sequence[str],
    *,
    timeout: float = COMMAND_TIMEOUT_SECONDS,
    console: Literal["warn", "info", "detail"] = "warn",
) -> str:
    """Run ``pgbackrest ARGS`` for our stanza as the clusters' owner; its output."""
    env = {**os.environ, "PGPASSWORD": localstack.POSTGRES_PASSWORD}
    argv = [
        binary(),
        f"--config={paths.conf}",
        f"--stanza={STANZA}",
        f"--log-level-console={console}",
        *args,
    ]
    return run(
        as_owner(argv),
        what=f"pgbackrest {' '.join(args)}",
        timeout=timeout,
        env=env,
        cwd=paths.root,
    )


def stanza_create(paths: BackrestPaths) -> None:
    """Create the stanza in both repositories (the primary must run); no-op once done."""
    if not paths.stanza_created:
        command(paths, ["stanza-create"])


def backup(
    paths: BackrestPaths, kind: BackupKind, repo: int, *, console: Literal["warn", "info"] = "warn"
) -> str:
    """One backup into one repository (pgBackRest writes a backup to one repository at a time)."""
    args = [f"--repo={repo}", f"--type={kind}", "backup"]
    return command(paths, args, timeout=BACKUP_TIMEOUT_SECONDS, console=console)


def expire_set(paths: BackrestPaths, repo: int, label: str) -> str:
    """Expire one backup and every backup that depends on it."""
    return command(paths, [f"--repo={repo}", f"--set={label}", "expire"])


def verify(paths: BackrestPaths) -> str:
    """Check every backup file and WAL segment in both repositories against its checksum."""
    return command(paths, ["verify"], timeout=BACKUP_TIMEOUT_SECONDS, console="info")


def check(paths: BackrestPaths) -> str:
    """Force a WAL switch on the primary and wait until that segment reached both repositories."""
    return command(paths, ["check"], console="info")


def info_json(paths: BackrestPaths) -> list[dict[str, object]]:
    stanzas: list[dict[str, object]] = orjson.loads(command(paths, ["--output=json", "info"]))
    return stanzas


def _backups(stanza: dict[str, object]) -> list[BackupInfo]:
    raw = stanza.get("backup")
    found: list[BackupInfo] = []
    for item in raw if isinstance(raw, list) else []:
        found.append(
            BackupInfo(
                label=item["label"],
                kind=item["type"],
                repo=int(item["database"]["repo-key"]),
                started=datetime.fromtimestamp(item["timestamp"]["start"], UTC),
                stopped=datetime.fromtimestamp(item["timestamp"]["stop"], UTC),
                prior=item.get("prior"),
            )
        )
    return found


def backups(paths: BackrestPaths) -> list[BackupInfo]:
    """Every backup of the stanza in every repository, oldest first."""
    stanzas = [s for s in info_json(paths) if s.get("name") == STANZA]
    found = [b for stanza in stanzas for b in _backups(stanza)]
    return sorted(found, key=lambda b: (b.stopped, b.repo))


def restore(paths: BackrestPaths, node: PgPaths, repo: int) -> str:
    """Restore the newest backup of ``repo`` into the node's (empty) data dir.

    Recovery replays WAL from that same repository only (pgBackRest writes ``--repo`` into the
    ``restore_command``) up to the end of the archive, then the node becomes a primary on a new
    timeline.
    """
    return command(
        paths,
        [f"--repo={repo}", f"--pg1-path={node.data}", "--type=default", "restore"],
        timeout=BACKUP_TIMEOUT_SECONDS,
        console="info",
    )
