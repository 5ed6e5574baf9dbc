"""Strict JSON for the files a person or another tool reads (``stages.jsonl``, ``report.json``): JSON has no NaN or
infinity, so non-finite floats are written as ``null``. Internal files that Python alone reads back (search checkpoints)
keep ``json.dumps``, so a resumed search sees the same values."""

from __future__ import annotations

import json
import math


def strict(value: object) -> object:
    """``value`` with every NaN or infinite float replaced by ``None`` (strict JSON has no NaN), in nested dicts,
    lists and tuples."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def json_text(data: object, indent: int | None = None) -> str:
    """``data`` as strict JSON (non-finite numbers as ``null``; other objects as ``str``)."""
    return json.dumps(strict(data), indent=indent, default=str, allow_nan=False)
