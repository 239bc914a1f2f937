"""Probes and their scores in DuckDB (schema v3 tables ``probes`` and ``probe_scores``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from hctembed.index.store import Store


def make_probe_id(*, kind: str, model_id: str, task: str, content: bytes) -> str:
    """``<kind>-<task>-<12 hex of sha256(model id, task, probe file bytes)>``: new weights, new id."""
    digest = hashlib.sha256(model_id.encode() + b"|" + task.encode() + b"|" + content).hexdigest()
    return f"{kind}-{task}-{digest[:12]}"


def register_probe(
    store: Store,
    *,
    probe_id: str,
    kind: str,
    model_id: str,
    task: str,
    path: str | None,
    config: dict,
    metrics: dict,
) -> None:
    """Insert or replace one ``probes`` row."""
    store.con.execute(
        "INSERT OR REPLACE INTO probes (probe_id, kind, model_id, task, path, config, metrics) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [probe_id, kind, model_id, task, path, json.dumps(config), json.dumps(metrics)],
    )


def write_scores(
    store: Store, *, probe_id: str, model_id: str, task: str, scan_ids: Sequence[str], scores: np.ndarray
) -> int:
    """Insert or replace ``scores [N]`` of ``scan_ids`` under ``probe_id`` in one transaction; returns N."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(scan_ids),):
        raise ValueError(f"{len(scan_ids)} scan ids but scores of shape {scores.shape}")
    if len(scan_ids) == 0:
        return 0
    table = pa.table(
        {
            "probe_id": [probe_id] * len(scan_ids),
            "scan_id": list(scan_ids),
            "model_id": [model_id] * len(scan_ids),
            "task": [task] * len(scan_ids),
            "score": pa.array(scores, pa.float64()),
        }
    )
    store.con.register("_scores_in", table)
    try:
        with store.transaction():
            store.con.execute(
                "INSERT OR REPLACE INTO probe_scores (probe_id, scan_id, model_id, task, score) "
                "SELECT probe_id, scan_id, model_id, task, score FROM _scores_in"
            )
    finally:
        store.con.unregister("_scores_in")
    return len(scan_ids)


def read_scores(store: Store, *, probe_id: str) -> dict[str, float]:
    rows = store.con.execute(
        "SELECT scan_id, score FROM probe_scores WHERE probe_id = ? ORDER BY scan_id", [probe_id]
    ).fetchall()
    return {r[0]: float(r[1]) for r in rows}
