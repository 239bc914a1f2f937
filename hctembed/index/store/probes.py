"""The ``probes`` and ``probe_scores`` tables: trained probes and their scores on stored scans."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from hctembed.index.store.connection import Database
from hctembed.index.store.rows import ProbeRow


class ProbesRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def register(self, row: ProbeRow) -> None:
        """Insert or replace one ``probes`` row."""
        self.db.run(
            "INSERT OR REPLACE INTO probes (probe_id, kind, model_id, task, path, config, metrics) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [row.probe_id, row.kind, row.model_id, row.task, row.path, json.dumps(row.config), json.dumps(row.metrics)],
        )

    def exists(self, probe_id: str) -> bool:
        return self.db.one("SELECT 1 FROM probes WHERE probe_id = ?", [probe_id]) is not None

    def write_scores(
        self, *, probe_id: str, model_id: str, task: str, scan_ids: Sequence[str], scores: np.ndarray
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
        with self.db.bulk("_scores_in", table), self.db.transaction():
            self.db.run(
                "INSERT OR REPLACE INTO probe_scores (probe_id, scan_id, model_id, task, score) "
                "SELECT probe_id, scan_id, model_id, task, score FROM _scores_in"
            )
        return len(scan_ids)

    def scores(self, probe_id: str) -> dict[str, float]:
        rows = self.db.rows("SELECT scan_id, score FROM probe_scores WHERE probe_id = ? ORDER BY scan_id", [probe_id])
        return {r[0]: float(r[1]) for r in rows}
