"""Where the project lives on disk, for defaults that point at the local stack and recorded data."""

from __future__ import annotations

from pathlib import Path

# libs/common/tokvel_common/paths.py -> the repository root is three levels up.
PROJECT_ROOT = Path(__file__).resolve().parents[3]
SHARED_DATA_DIR = (PROJECT_ROOT.parent / "shared" / "data").resolve()
DEFAULT_REPLAY_DATA = SHARED_DATA_DIR / "cmc-web-2017-08-10_5min_top200.jsonl.gz"
