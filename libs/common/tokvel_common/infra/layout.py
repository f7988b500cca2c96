"""Where the local stack keeps its state: the run dir, the jar cache, the fallback dir."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tokvel_common.paths import PROJECT_ROOT

RUN_DIR_ENV = "TOKVEL_RUN_DIR"
# /var/tmp: world-traversable (sticky, 1777) on every Debian, and kept across reboots unlike
# /tmp, which may be a tmpfs.
FALLBACK_PARENT = Path("/var/tmp")  # noqa: S108 - a private, per-run-dir subdirectory


@dataclass(frozen=True)
class Layout:
    project_root: Path
    run_dir: Path
    cache_dir: Path

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Layout:
        env = os.environ if environ is None else environ
        run_dir = Path(env.get(RUN_DIR_ENV) or PROJECT_ROOT / ".run").expanduser().absolute()
        xdg_cache = env.get("XDG_CACHE_HOME")
        cache_root = Path(xdg_cache) if xdg_cache else Path.home() / ".cache"
        return cls(PROJECT_ROOT, run_dir, cache_root.expanduser().absolute() / "tokvel")

    @property
    def fallback_dir(self) -> Path:
        """Data that cannot live in the run dir goes here; one per run dir, hence the hash."""
        digest = hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:12]
        return FALLBACK_PARENT / f"tokvel-{digest}"

    @property
    def lock_path(self) -> Path:
        return self.run_dir / ".infra.lock"

    @property
    def apt_log(self) -> Path:
        return self.run_dir / "apt.log"

    def ensure_run_dir(self) -> None:
        if self.run_dir.is_dir():
            return  # an existing dir keeps the permissions its owner gave it
        self.run_dir.mkdir(parents=True)
        # 0755 whatever the umask: the PostgreSQL user must be able to reach its data below it.
        self.run_dir.chmod(0o755)
