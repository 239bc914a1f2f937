"""The one converter from results to plain JSON values (used for results files and JSON lines alike)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """JSON-ready values: NaN/inf become null, numpy scalars and arrays become numbers and lists, dataclasses
    with a ``to_dict`` their dict, paths strings."""
    if hasattr(value, "to_dict") and not isinstance(value, dict):
        return json_safe(value.to_dict())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, value: Any) -> Path:
    """``value`` as indented JSON in ``path`` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(value), indent=2))
    return path
