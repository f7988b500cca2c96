"""Values on their way into PostgreSQL ``numeric`` columns, without loss.

A JSON double is written as its shortest round-trip decimal (``repr``), which is the exact text
CMC sent whenever CMC sent at most 17 significant digits (a double cannot carry more); an
integer is written exactly whatever its size. Nothing is rounded or truncated on the way.
"""

from __future__ import annotations

import math
from decimal import Decimal


def as_numeric(value: int | float | None) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, int):
        return Decimal(value)
    if not math.isfinite(value):
        raise ValueError(f"{value!r} has no numeric representation")
    return Decimal(repr(value))
