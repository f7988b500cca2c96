"""What ``tokvel infra status`` reports about one service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None  # the live process we started, None when stopped
    address: str
    accepting: bool  # something answers TCP on the address
    data_dir: Path
    log: Path
    note: str | None = None

    @property
    def state(self) -> str:
        if self.pid is None:
            return "stopped (port taken by another process)" if self.accepting else "stopped"
        return "running" if self.accepting else "running, not accepting connections"
