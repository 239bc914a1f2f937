"""The ``labels`` table: long-format labels ``(scan_id, name, value)`` and where they came from."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa

from hctembed.index.store.connection import Database


class LabelsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def set(self, rows: Iterable[tuple[str, str, float]], *, origin: str) -> int:
        """Insert or replace labels ``(scan_id, name, value)``; returns how many rows were written."""
        rows = list(rows)
        if not rows:
            return 0
        table = pa.table(
            {
                "scan_id": [r[0] for r in rows],
                "name": [r[1] for r in rows],
                "value": pa.array([float(r[2]) for r in rows], pa.float64()),
                "origin": [origin] * len(rows),
            }
        )
        with self.db.bulk("_labels_in", table):
            self.db.run("INSERT OR REPLACE INTO labels SELECT scan_id, name, value, origin FROM _labels_in")
        return len(rows)

    def of(self, scan_ids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """``{scan_id: {name: value}}`` for the given scans (all scans when None)."""
        if scan_ids is not None:  # only their rows (a batch of an embed asks for a few of many)
            with self.db.bulk("_labels_of", pa.table({"scan_id": pa.array(list(scan_ids), pa.string())})):
                rows = self.db.rows(
                    "SELECT l.scan_id, l.name, l.value FROM labels l JOIN _labels_of w ON w.scan_id = l.scan_id "
                    "ORDER BY l.scan_id, l.name"
                )
        else:
            rows = self.db.rows("SELECT scan_id, name, value FROM labels ORDER BY scan_id, name")
        wanted = set(scan_ids) if scan_ids is not None else None
        out: dict[str, dict[str, float]] = {}
        for scan_id, name, value in rows:
            if wanted is None or scan_id in wanted:
                out.setdefault(scan_id, {})[name] = value
        return out
