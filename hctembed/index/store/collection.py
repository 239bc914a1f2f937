"""A collection bound to its store: the vectors of one model under one preprocessing, their int64 ids, and the
per-file status of embedding them. Every vector operation goes through one of these, so a vector is never
written to or read from another model's table."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from hctembed.index.store.errors import ModelMismatchError, StoreError
from hctembed.index.store.rows import CollectionRow, HitRow, ModelRow, StatusRow

if TYPE_CHECKING:
    from hctembed.index.store.store import Store


class Collection:
    """``store.collection(...)`` / ``store.resolve_collection(...)`` hand these out."""

    def __init__(self, store: Store, row: CollectionRow) -> None:
        self.store = store
        self.row = row
        self._db = store.db

    def __repr__(self) -> str:
        return f"Collection({self.row.collection_id}, {self.model_id} / {self.fingerprint}, dim {self.dim})"

    @property
    def collection_id(self) -> int:
        return self.row.collection_id

    @property
    def model_id(self) -> str:
        return self.row.model_id

    @property
    def fingerprint(self) -> str:
        return self.row.fingerprint

    @property
    def dim(self) -> int:
        return self.row.dim

    @property
    def table(self) -> str:
        return self.row.table

    def model(self) -> ModelRow:
        return self.store.models.get(self.model_id)

    def index_files(self) -> tuple[Path, Path]:
        """(the FAISS index, its manifest) of this collection, beside the database."""
        return self.store.paths.index_files(self.collection_id)

    # -- vectors ----------------------------------------------------------------------------------------
    def add(self, *, scan_ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """Store ``vectors [N, dim]`` for ``scan_ids`` (replacing older vectors of the same scans).

        Returns the new int64 ids ``[N]`` in input order. One transaction (or part of the caller's).
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ModelMismatchError(f"vectors of shape {vectors.shape} do not fit {self.model_id} (dim {self.dim})")
        if len(scan_ids) != len(vectors):
            raise ValueError("scan_ids and vectors differ in length")
        if len(scan_ids) == 0:
            return np.zeros(0, np.int64)
        table = pa.table(
            {
                "scan_id": list(scan_ids),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim),
            }
        )
        with self._db.bulk("_vec_in", table), self._db.transaction():
            self._db.run(f"DELETE FROM {self.table} WHERE scan_id IN (SELECT scan_id FROM _vec_in)")
            rows = self._db.rows(
                f"INSERT INTO {self.table} (scan_id, vector) SELECT scan_id, vector FROM _vec_in RETURNING id, scan_id"
            )
        by_scan = {scan_id: vid for vid, scan_id in rows}
        return np.array([by_scan[s] for s in scan_ids], dtype=np.int64)

    def delete(self, scan_ids: Sequence[str]) -> int:
        """Remove the vectors of ``scan_ids`` (e.g. a changed file that no longer loads); returns how many."""
        if not scan_ids:
            return 0
        before = self.count()
        with self._db.bulk("_del_in", pa.table({"scan_id": list(scan_ids)})):
            self._db.run(f"DELETE FROM {self.table} WHERE scan_id IN (SELECT scan_id FROM _del_in)")
            self._db.run(
                "DELETE FROM scan_planes WHERE collection_id = ? AND scan_id IN (SELECT scan_id FROM _del_in)",
                [self.collection_id],
            )
        return before - self.count()

    def count(self) -> int:
        return int(self._db.one(f"SELECT count(*) FROM {self.table}")[0])

    def set_planes(self, rows: Sequence[tuple[str, bytes]]) -> None:
        """Store scans' montage planes ``(scan_id, bytes)`` (replacing older ones)."""
        if not rows:
            return
        table = pa.table(
            {
                "collection_id": pa.array([self.collection_id] * len(rows), pa.int32()),
                "scan_id": [r[0] for r in rows],
                "planes": pa.array([r[1] for r in rows], pa.binary()),
            }
        )
        with self._db.bulk("_planes_in", table):
            self._db.run("INSERT OR REPLACE INTO scan_planes SELECT collection_id, scan_id, planes FROM _planes_in")

    def planes(self, scan_ids: Sequence[str]) -> dict[str, bytes]:
        """``{scan_id: bytes}`` of the montage planes stored for ``scan_ids`` (scans without any are absent)."""
        if not scan_ids:
            return {}
        with self._db.bulk("_planes_ids", pa.table({"scan_id": list(scan_ids)})):
            rows = self._db.rows(
                "SELECT p.scan_id, p.planes FROM scan_planes p JOIN _planes_ids i ON i.scan_id = p.scan_id "
                "WHERE p.collection_id = ?",
                [self.collection_id],
            )
        return {r[0]: bytes(r[1]) for r in rows}

    def last_embedded(self):
        """When the newest vector was stored (``datetime``), or None for an empty collection."""
        return self._db.one(f"SELECT max(created_at) FROM {self.table}")[0]

    def preprocess(self) -> dict[str, Any]:
        """The preprocessing the collection's vectors were made with (its config as stored, a dict)."""
        row = self._db.one("SELECT preprocess FROM collections WHERE collection_id = ?", [self.collection_id])
        return json.loads(row[0]) if row and row[0] else {}

    def rows_digest(self) -> tuple[int, str]:
        """(row count, sha256 of every row's id, scan id and insertion time in id order): what an index built
        from these rows records, so that an index built from other rows with the same ids (a copy of the
        database that has since diverged) is told apart. Vectors never change in place (a new vector is a new
        row), so the insertion time stands for the vector without reading it."""
        tab = self._db.arrow(f"SELECT id, scan_id, epoch_us(created_at) AS t FROM {self.table} ORDER BY id")
        digest = hashlib.sha256()
        digest.update(np.asarray(tab.column("id").to_numpy(), dtype="<i8").tobytes())
        digest.update(np.asarray(tab.column("t").to_numpy(zero_copy_only=False), dtype="<i8").tobytes())
        digest.update("\0".join(tab.column("scan_id").to_pylist()).encode())
        return tab.num_rows, digest.hexdigest()

    def ids(self) -> np.ndarray:
        """All vector ids, sorted, int64 ``[N]``."""
        tab = self._db.arrow(f"SELECT id FROM {self.table} ORDER BY id")
        return np.asarray(tab.column("id").to_numpy(), dtype=np.int64)

    def keys(self) -> tuple[np.ndarray, list[str]]:
        """``(ids [N] int64, scan_ids)`` ordered by id, without the vectors (what a server holding a saved index
        needs to name its hits)."""
        tab = self._db.arrow(f"SELECT id, scan_id FROM {self.table} ORDER BY id")
        return np.asarray(tab.column("id").to_numpy(), dtype=np.int64), tab.column("scan_id").to_pylist()

    def vectors(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(ids [N] int64, X [N, dim] float32, scan_ids)``, ordered by id."""
        tab = self._db.arrow(f"SELECT id, scan_id, vector FROM {self.table} ORDER BY id")
        ids = np.asarray(tab.column("id").to_numpy(), dtype=np.int64)
        vec = tab.column("vector").combine_chunks()
        if len(vec) == 0:
            return ids, np.zeros((0, self.dim), np.float32), []
        flat = np.asarray(vec.values.to_numpy(zero_copy_only=False), dtype=np.float32)
        return ids, flat.reshape(-1, self.dim), tab.column("scan_id").to_pylist()

    def vector_of(self, scan_id: str) -> tuple[int, np.ndarray]:
        """(id, vector ``[dim]``) of one stored scan."""
        row = self._db.one(f"SELECT id, vector FROM {self.table} WHERE scan_id = ?", [scan_id])
        if row is None:
            if not self.store.scans.exists(scan_id):
                raise StoreError(f"no such scan: {scan_id!r} is not in {self.store.path.name}")
            reason = self._db.one(
                "SELECT status, reason FROM scan_status WHERE collection_id = ? AND scan_id = ? LIMIT 1",
                [self.collection_id, scan_id],
            )
            why = f" (it was {reason[0]}: {reason[1]})" if reason and reason[1] else ""
            raise StoreError(f"scan {scan_id} has no vector for model {self.model_id}{why}")
        return int(row[0]), np.asarray(row[1], dtype=np.float32)

    def hits(self, ids: Sequence[int]) -> dict[int, HitRow]:
        """``{id: HitRow}`` for vector ids; ``path`` is the scan's file or folder as the locator beside the database
        knows it (or, in a database written before the locator, as the database itself recorded it), else None."""
        if len(ids) == 0:
            return {}
        with self._db.bulk("_ids_in", pa.table({"id": pa.array(list(ids), pa.int64())})):
            rows = self._db.rows(
                "SELECT e.id, e.scan_id, s.patient_id "
                f"FROM _ids_in i JOIN {self.table} e ON e.id = i.id LEFT JOIN scans s ON s.scan_id = e.scan_id"
            )
        located = self.store.locations([r[1] for r in rows])
        return {
            int(r[0]): HitRow(
                id=int(r[0]),
                scan_id=r[1],
                patient_id=r[2],
                path=str(located[r[1]].path) if r[1] in located else None,
            )
            for r in rows
        }

    # -- per-file status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, StatusRow]:
        """``{source: StatusRow}`` of every file this collection has met."""
        rows = self._db.rows(
            "SELECT source, scan_id, status, reason, attempts, file_size, file_mtime_ns FROM scan_status "
            "WHERE collection_id = ?",
            [self.collection_id],
        )
        return {r[0]: StatusRow(*r) for r in rows}

    def record_statuses(self, rows: Sequence[StatusRow]) -> None:
        """Insert or update status rows in one statement; each update counts one more attempt (the rows'
        own ``attempts`` are ignored). Sources must be unique within ``rows``."""
        if not rows:
            return
        if len({r.source for r in rows}) != len(rows):
            raise ValueError("record_statuses: a source occurs twice in one call")
        table = pa.table(
            {
                "source": pa.array([r.source for r in rows], pa.string()),
                "scan_id": pa.array([r.scan_id for r in rows], pa.string()),
                "status": pa.array([r.status for r in rows], pa.string()),
                "reason": pa.array([r.reason for r in rows], pa.string()),
                "file_size": pa.array([r.file_size for r in rows], pa.int64()),
                "file_mtime_ns": pa.array([r.file_mtime_ns for r in rows], pa.int64()),
            }
        )
        with self._db.bulk("_status_in", table):
            self._db.run(
                "INSERT INTO scan_status (collection_id, source, scan_id, status, reason, attempts, file_size, "
                "file_mtime_ns) SELECT ?, source, scan_id, status, reason, 1, file_size, file_mtime_ns "
                "FROM _status_in ON CONFLICT (collection_id, source) DO UPDATE SET "
                "scan_id = excluded.scan_id, status = excluded.status, reason = excluded.reason, "
                "attempts = scan_status.attempts + 1, file_size = excluded.file_size, "
                "file_mtime_ns = excluded.file_mtime_ns, updated_at = now()",
                [self.collection_id],
            )

    def failures(self) -> list[tuple[str, str]]:
        """(source, reason) of every file that failed, sorted by source."""
        return self._db.rows(
            "SELECT source, reason FROM scan_status WHERE collection_id = ? AND status = 'failed' ORDER BY source",
            [self.collection_id],
        )
