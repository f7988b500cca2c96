"""The one shape every benchmark reports in, so ``make bench`` can tabulate and compare runs.

Each ``bench/*.py`` script takes ``--json PATH`` and, when given, writes there a list of
:class:`Figure` (``write_figures``). ``bench/run.py`` runs them all, prints one table and writes
one JSON file with every figure and the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One row of the table: tokvel's value, the baseline's in the same run, and the target.

    ``met`` is decided by the script that measured the figure (it knows what the target means);
    ``ratio`` is tokvel / baseline where a baseline exists.
    """

    figure: str
    unit: str
    tokvel: float
    target: str
    met: bool
    baseline: float | None = None
    baseline_name: str | None = None
    ratio: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
    }


def write_figures(path: Path | str, figures: list[Figure]) -> None:
    payload = {"machine": machine(), "figures": [asdict(f) for f in figures]}
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def read_figures(path: Path | str) -> list[Figure]:
    payload = json.loads(Path(path).read_text())
    return [Figure(**row) for row in payload["figures"]]
