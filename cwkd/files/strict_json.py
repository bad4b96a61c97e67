"""JSON that strict parsers read: what cwkd writes to metrics.jsonl and prints for ``--json``.

Python's ``json`` writes NaN and Infinity as bare words, which are not JSON; here they become ``null``,
and the record says which values they were. Imports nothing heavy, so the CLI can use it freely.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_text(obj: Any, **kwargs: Any) -> str:
    """Strict JSON for ``obj``: a NaN or infinity becomes ``null``, and a top-level dict lists where in ``nonfinite``.

    Every JSON cwkd writes goes through here (metrics.jsonl, ``--json``), so a strict parser reads it all.

    Example:
        >>> json_text({"epoch": 2, "val_loss": float("nan")})
        '{"epoch": 2, "val_loss": null, "nonfinite": ["val_loss"]}'
    """
    found: list[str] = []
    clean = _finite(obj, "", found)
    if found and isinstance(clean, dict):
        clean["nonfinite"] = found
    return json.dumps(clean, allow_nan=False, **kwargs)


def _finite(obj: Any, where: str, found: list[str]) -> Any:
    """A copy of ``obj`` with non-finite floats (and 0-d tensors) as None, their dotted paths added to ``found``."""
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append(where or "value")
        return None
    if isinstance(obj, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj
