"""Linear probe files: JSON with the logistic-regression coefficients, loaded strictly (exact keys, dims)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hctembed.eval.classification import LinearProbe
from hctembed.probe.attentive import ProbeError

FORMAT = "hctembed-linear-probe"
KEYS = {"format", "dim", "coef", "intercept", "C", "meta"}


def save_linear(probe: LinearProbe, path: str | Path, *, meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "dim": int(probe.coef.size),
        "coef": [float(v) for v in probe.coef],
        "intercept": float(probe.intercept),
        "C": float(probe.C),
        "meta": meta,
    }
    path.write_text(json.dumps(doc, indent=1))


def load_linear(path: str | Path) -> tuple[LinearProbe, dict]:
    """Returns (probe, meta); a clear error on a missing file, other keys, or a coefficient count != dim."""
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"probe file not found: {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProbeError(f"{path} is not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProbeError(f"{path} is not a linear probe file")
    if set(doc) != KEYS:
        raise ProbeError(f"{path}: missing keys {sorted(KEYS - set(doc))}, unexpected {sorted(set(doc) - KEYS)}")
    coef = np.asarray(doc["coef"], dtype=np.float64)
    if coef.ndim != 1 or coef.size != int(doc["dim"]) or not np.all(np.isfinite(coef)):
        raise ProbeError(f"{path}: {coef.size} coefficients for dim {doc['dim']}, or non-finite values")
    return LinearProbe(coef=coef, intercept=float(doc["intercept"]), C=float(doc["C"])), dict(doc["meta"])
