"""The ``scans`` table: PHI-free facts per scan, shared by every collection."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from hctembed.index.store.connection import Database
from hctembed.index.store.paths import resolved_path
from hctembed.index.store.rows import ScanRow


class ScansRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def upsert(self, rows: Sequence[ScanRow]) -> None:
        """Insert or update scans; a known patient id is kept when the new row has none. ``source`` and
        ``archive_root`` are written empty whatever the rows say (paths go to the locator, see
        :meth:`Store.record_locations`); an update clears what an older version stored there."""
        if not rows:
            return
        table = pa.table(
            {
                "scan_id": [r.scan_id for r in rows],
                "patient_id": pa.array([r.patient_id for r in rows], pa.string()),
                "source": pa.array([None] * len(rows), pa.string()),
                "archive_root": pa.array([None] * len(rows), pa.string()),
                "format": pa.array([r.format for r in rows], pa.string()),
                "meta": [json.dumps(r.meta or {}) for r in rows],
            }
        )
        with self.db.bulk("_scans_in", table):
            self.db.run(
                "INSERT INTO scans (scan_id, patient_id, source, archive_root, format, meta) "
                "SELECT scan_id, patient_id, source, archive_root, format, meta FROM _scans_in "
                "ON CONFLICT (scan_id) DO UPDATE SET "
                "patient_id = coalesce(excluded.patient_id, scans.patient_id), source = excluded.source, "
                "archive_root = excluded.archive_root, format = excluded.format, meta = excluded.meta"
            )

    def add_missing(self, scan_ids: Sequence[str], *, format: str) -> int:
        """Rows for scans not stored yet (only their id and ``format``); returns how many were added."""
        known = {r[0] for r in self.db.rows("SELECT scan_id FROM scans")}
        new = sorted(set(scan_ids) - known)
        self.upsert([ScanRow(scan_id=s, format=format) for s in new])
        return len(new)

    def set_patients(self, mapping: dict[str, str]) -> None:
        """Fill ``patient_id`` of known scans (from a labels file)."""
        if not mapping:
            return
        table = pa.table({"scan_id": list(mapping), "patient_id": list(mapping.values())})
        with self.db.bulk("_pat_in", table):
            self.db.run("UPDATE scans SET patient_id = p.patient_id FROM _pat_in p WHERE scans.scan_id = p.scan_id")

    def legacy_locations(self, scan_ids: Sequence[str] | None = None) -> dict[str, tuple[str, str]]:
        """``{scan_id: (archive_root, source)}`` of the scans among ``scan_ids`` (all when None) whose paths a
        database written before the locator recorded in its own columns (new rows leave them empty)."""
        legacy = "s.archive_root IS NOT NULL AND s.source IS NOT NULL"
        if scan_ids is None:
            rows = self.db.rows(f"SELECT s.scan_id, s.archive_root, s.source FROM scans s WHERE {legacy}")
        elif not scan_ids:
            return {}
        else:
            with self.db.bulk("_roots_in", pa.table({"scan_id": list(scan_ids)})):
                rows = self.db.rows(
                    "SELECT s.scan_id, s.archive_root, s.source FROM scans s "
                    f"JOIN _roots_in r ON r.scan_id = s.scan_id WHERE {legacy}"
                )
        return {r[0]: (resolved_path(r[1], db=self.db.path), r[2]) for r in rows}

    def clear_legacy_locations(self) -> None:
        """Empty the path columns (once :meth:`legacy_locations` has gone to the locator)."""
        self.db.run(
            "UPDATE scans SET archive_root = NULL, source = NULL WHERE archive_root IS NOT NULL OR source IS NOT NULL"
        )

    def exists(self, scan_id: str) -> bool:
        return self.db.one("SELECT count(*) FROM scans WHERE scan_id = ?", [scan_id])[0] > 0

    def all(self) -> list[ScanRow]:
        """Every stored scan's row."""
        rows = self.db.rows("SELECT scan_id, patient_id, format, meta FROM scans ORDER BY scan_id")
        return [ScanRow(r[0], r[1], r[2], json.loads(r[3]) if r[3] else {}) for r in rows]

    def meta(self) -> dict[str, dict[str, Any]]:
        """``{scan_id: meta}`` of every stored scan (the protocol facts recorded at embedding time)."""
        rows = self.db.rows("SELECT scan_id, meta FROM scans")
        return {scan_id: (json.loads(meta) if meta else {}) for scan_id, meta in rows}
