"""DuckDB store: the source of truth for scans, models, vectors, labels and per-scan status.

Layout (schema version 1; later versions add numbered migrations to ``MIGRATIONS``):

* ``models``       one row per encoder (config, weights path and digest, model card);
* ``collections``  one per (model_id, preprocessing fingerprint): the vectors of one model under one
  preprocessing, with their own ``embeddings_<collection_id>`` table whose ``vector`` is ``FLOAT[dim]``;
* ``scans``        PHI-free facts per scan (pseudonymous ids, source, protocol facts);
* ``labels``       long-format labels ``(scan_id, name, value)``;
* ``scan_status``  one row per (collection, source file): embedded / failed with reason and attempts.

Embedding ids come from one sequence: int64, monotonic, never reused (also across collections).
Bulk inserts go through Arrow (row-wise inserts of 768-float lists are ~60x slower).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from hctembed.errors import HctembedError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE SEQUENCE embedding_id_seq START 1",
        """CREATE TABLE models (
            model_id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, dim INTEGER NOT NULL,
            config JSON, weights_path VARCHAR, weights_digest VARCHAR, card JSON,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE collections (
            collection_id INTEGER PRIMARY KEY, model_id VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL,
            preprocess JSON, dim INTEGER NOT NULL, created_at TIMESTAMP DEFAULT current_timestamp,
            UNIQUE (model_id, fingerprint))""",
        """CREATE TABLE scans (
            scan_id VARCHAR PRIMARY KEY, patient_id VARCHAR, source VARCHAR, format VARCHAR,
            meta JSON, added_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE labels (
            scan_id VARCHAR NOT NULL, name VARCHAR NOT NULL, value DOUBLE, origin VARCHAR,
            PRIMARY KEY (scan_id, name))""",
        """CREATE TABLE scan_status (
            collection_id INTEGER NOT NULL, source VARCHAR NOT NULL, scan_id VARCHAR,
            status VARCHAR NOT NULL, reason VARCHAR, attempts INTEGER NOT NULL DEFAULT 0,
            file_size BIGINT, file_mtime_ns BIGINT, updated_at TIMESTAMP DEFAULT current_timestamp,
            PRIMARY KEY (collection_id, source))""",
    ),
    # v2: where each scan's archive lives (an absolute folder), so search results can be opened again
    2: ("ALTER TABLE scans ADD COLUMN archive_root VARCHAR",),
    # v3: trained probes (hctembed probe train) and their scores on stored scans (hctembed probe apply)
    3: (
        """CREATE TABLE probes (
            probe_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL, model_id VARCHAR NOT NULL,
            task VARCHAR NOT NULL, path VARCHAR, config JSON, metrics JSON,
            created_at TIMESTAMP DEFAULT current_timestamp)""",
        """CREATE TABLE probe_scores (
            probe_id VARCHAR NOT NULL, scan_id VARCHAR NOT NULL, model_id VARCHAR NOT NULL,
            task VARCHAR NOT NULL, score DOUBLE NOT NULL, created_at TIMESTAMP DEFAULT current_timestamp,
            PRIMARY KEY (probe_id, scan_id))""",
    ),
    # v4: a random identity per database file, recorded in FAISS manifests so that an index left over from
    # a deleted or replaced database (whose ids restart at 1) is never taken for this one's
    4: (
        "CREATE TABLE store_info (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
        "INSERT INTO store_info VALUES ('store_id', CAST(uuid() AS VARCHAR))",
    ),
}


class StoreError(HctembedError, RuntimeError):
    """A problem with the database file that the user must resolve; the message says how."""


class ModelMismatchError(StoreError):
    """Vectors of two different models or preprocessings were about to meet."""


@dataclass(frozen=True)
class Collection:
    """The vectors of one model under one preprocessing fingerprint."""

    collection_id: int
    model_id: str
    fingerprint: str
    dim: int

    @property
    def table(self) -> str:
        return f"embeddings_{self.collection_id}"


@dataclass(frozen=True)
class StatusRow:
    source: str
    scan_id: str | None
    status: str
    reason: str | None
    attempts: int
    file_size: int | None
    file_mtime_ns: int | None


class Store:
    """A DuckDB file opened for reading or writing; use as a context manager."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        if read_only and not self.path.exists():
            raise StoreError(f"no database at {self.path}; run `hctembed embed ARCHIVE --db {self.path}` first")
        try:
            self.con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise StoreError(
                    f"{self.path} is open for writing by another process (another `hctembed embed`?); "
                    "wait for it to finish, or use a separate --db"
                ) from None
            raise StoreError(f"cannot open {self.path}: {exc}") from None
        self.read_only = read_only
        self._tx_depth = 0
        if not read_only:
            self._migrate()
        elif self.schema_version() < SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema v{self.schema_version()}; open it once for writing")

    # -- lifecycle ------------------------------------------------------------------------------------
    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def _one(self, sql: str, params: list | None = None) -> tuple | None:
        """First row or None; reads the whole result (DuckDB 2 refuses new work on a half-read one)."""
        rows = self.con.execute(sql, params or []).fetchall()
        return rows[0] if rows else None

    def checkpoint(self) -> None:
        self.con.execute("CHECKPOINT")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All writes inside commit together or not at all; nested uses join the outer transaction."""
        if self._tx_depth:
            self._tx_depth += 1
            try:
                yield
            finally:
                self._tx_depth -= 1
            return
        self.con.execute("BEGIN TRANSACTION")
        self._tx_depth = 1
        try:
            yield
        except BaseException:
            self._tx_depth = 0
            self.con.execute("ROLLBACK")
            raise
        self._tx_depth = 0
        self.con.execute("COMMIT")

    # -- schema ---------------------------------------------------------------------------------------
    def schema_version(self) -> int:
        exists = self._one("SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'")[0]
        if not exists:
            return 0
        row = self._one("SELECT max(version) FROM schema_version")
        return int(row[0] or 0)

    def _migrate(self) -> None:
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
            "applied_at TIMESTAMP DEFAULT current_timestamp)"
        )
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema v{current}, newer than this hctembed (v{SCHEMA_VERSION}); upgrade"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.transaction():
                for statement in MIGRATIONS[version]:
                    self.con.execute(statement)
                self.con.execute("INSERT INTO schema_version (version) VALUES (?)", [version])
            log.info("database %s migrated to schema v%d", self.path, version)

    @property
    def store_id(self) -> str:
        """This database file's random identity (created with it; survives copies of the file)."""
        row = self._one("SELECT value FROM store_info WHERE key = 'store_id'")
        if row is None:
            raise StoreError(f"{self.path} has no store identity; open it once for writing")
        return str(row[0])

    # -- models and collections -------------------------------------------------------------------------
    def register_model(
        self,
        *,
        model_id: str,
        name: str,
        dim: int,
        config: dict[str, Any],
        weights_path: str | None,
        weights_digest: str | None,
        card: dict[str, Any] | None = None,
    ) -> None:
        row = self._one("SELECT dim, weights_digest FROM models WHERE model_id = ?", [model_id])
        if row is not None:
            if int(row[0]) != dim or (row[1] and weights_digest and row[1] != weights_digest):
                raise ModelMismatchError(
                    f"model {model_id} is stored with dim {row[0]} / weights {row[1]}, "
                    f"but now has dim {dim} / weights {weights_digest}"
                )
            return
        self.con.execute(
            "INSERT INTO models (model_id, name, dim, config, weights_path, weights_digest, card) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [model_id, name, dim, json.dumps(config), weights_path, weights_digest, json.dumps(card or {})],
        )

    def model(self, model_id: str) -> dict[str, Any]:
        row = self._one(
            "SELECT model_id, name, dim, config, weights_path, weights_digest, card FROM models WHERE model_id = ?",
            [model_id],
        )
        if row is None:
            raise StoreError(f"model {model_id} is not in {self.path}")
        keys = ["model_id", "name", "dim", "config", "weights_path", "weights_digest", "card"]
        out = dict(zip(keys, row, strict=True))
        out["config"] = json.loads(out["config"]) if out["config"] else {}
        out["card"] = json.loads(out["card"]) if out["card"] else {}
        return out

    def collection(
        self, *, model_id: str, fingerprint: str, dim: int | None = None, preprocess: dict | None = None
    ) -> Collection:
        """The collection for (model, fingerprint); created (with its vector table) when ``dim`` is given."""
        row = self._one(
            "SELECT collection_id, dim FROM collections WHERE model_id = ? AND fingerprint = ?",
            [model_id, fingerprint],
        )
        if row is not None:
            if dim is not None and int(row[1]) != dim:
                raise ModelMismatchError(f"collection {model_id}/{fingerprint} has dim {row[1]}, not {dim}")
            return Collection(int(row[0]), model_id, fingerprint, int(row[1]))
        if dim is None:
            stored = ", ".join(f"{c.model_id} / {c.fingerprint}" for c in self.collections()) or "none"
            raise ModelMismatchError(
                f"no vectors for model {model_id} with preprocessing {fingerprint} in {self.path}; stored: {stored}"
            )
        next_id = self._one("SELECT coalesce(max(collection_id), 0) + 1 FROM collections")[0]
        coll = Collection(int(next_id), model_id, fingerprint, int(dim))
        with self.transaction():
            self.con.execute(
                "INSERT INTO collections (collection_id, model_id, fingerprint, preprocess, dim) "
                "VALUES (?, ?, ?, ?, ?)",
                [coll.collection_id, model_id, fingerprint, json.dumps(preprocess or {}), dim],
            )
            self.con.execute(
                f"CREATE TABLE {coll.table} (id BIGINT PRIMARY KEY DEFAULT nextval('embedding_id_seq'), "
                f"scan_id VARCHAR NOT NULL UNIQUE, vector FLOAT[{int(dim)}] NOT NULL, "
                "created_at TIMESTAMP DEFAULT current_timestamp)"
            )
        return coll

    def collections(self) -> list[Collection]:
        rows = self.con.execute(
            "SELECT collection_id, model_id, fingerprint, dim FROM collections ORDER BY collection_id"
        ).fetchall()
        return [Collection(int(r[0]), r[1], r[2], int(r[3])) for r in rows]

    def resolve_collection(self, *, model_id: str | None = None) -> Collection:
        """The only collection, or the one of ``model_id``; a clear error when that is ambiguous."""
        colls = self.collections()
        if model_id is not None:
            colls = [c for c in colls if c.model_id == model_id or c.model_id.startswith(model_id)]
        if len(colls) == 1:
            return colls[0]
        stored = ", ".join(c.model_id for c in self.collections()) or "none"
        if not colls:
            raise StoreError(f"no embeddings for model {model_id or '(any)'} in {self.path}; stored: {stored}")
        raise StoreError(f"{self.path} holds several models ({stored}); choose one with --model")

    # -- scans, labels, status ---------------------------------------------------------------------------
    def upsert_scans(self, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or update scans (keys: scan_id, patient_id, source, archive_root, format, meta)."""
        if not rows:
            return
        table = pa.table(
            {
                "scan_id": [r["scan_id"] for r in rows],
                "patient_id": [r.get("patient_id") for r in rows],
                "source": [r.get("source") for r in rows],
                "archive_root": [r.get("archive_root") for r in rows],
                "format": [r.get("format") for r in rows],
                "meta": [json.dumps(r.get("meta") or {}) for r in rows],
            }
        )
        self.con.register("_scans_in", table)
        try:
            self.con.execute(
                "INSERT INTO scans (scan_id, patient_id, source, archive_root, format, meta) "
                "SELECT scan_id, patient_id, source, archive_root, format, meta FROM _scans_in "
                "ON CONFLICT (scan_id) DO UPDATE SET "
                "patient_id = coalesce(excluded.patient_id, scans.patient_id), source = excluded.source, "
                "archive_root = excluded.archive_root, format = excluded.format, meta = excluded.meta"
            )
        finally:
            self.con.unregister("_scans_in")

    def set_labels(self, rows: Iterable[tuple[str, str, float]], *, origin: str) -> int:
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
        self.con.register("_labels_in", table)
        try:
            self.con.execute("INSERT OR REPLACE INTO labels SELECT scan_id, name, value, origin FROM _labels_in")
        finally:
            self.con.unregister("_labels_in")
        return len(rows)

    def set_patients(self, mapping: dict[str, str]) -> None:
        """Fill ``scans.patient_id`` for known scans (from a labels file)."""
        if not mapping:
            return
        table = pa.table({"scan_id": list(mapping), "patient_id": list(mapping.values())})
        self.con.register("_pat_in", table)
        try:
            self.con.execute(
                "UPDATE scans SET patient_id = p.patient_id FROM _pat_in p WHERE scans.scan_id = p.scan_id"
            )
        finally:
            self.con.unregister("_pat_in")

    def labels(self, scan_ids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """``{scan_id: {name: value}}`` for the given scans (all scans when None)."""
        rows = self.con.execute("SELECT scan_id, name, value FROM labels ORDER BY scan_id, name").fetchall()
        wanted = set(scan_ids) if scan_ids is not None else None
        out: dict[str, dict[str, float]] = {}
        for scan_id, name, value in rows:
            if wanted is None or scan_id in wanted:
                out.setdefault(scan_id, {})[name] = value
        return out

    def status(self, collection: Collection) -> dict[str, StatusRow]:
        rows = self.con.execute(
            "SELECT source, scan_id, status, reason, attempts, file_size, file_mtime_ns FROM scan_status "
            "WHERE collection_id = ?",
            [collection.collection_id],
        ).fetchall()
        return {r[0]: StatusRow(*r) for r in rows}

    def record_statuses(self, collection: Collection, rows: Sequence[dict[str, Any]]) -> None:
        """Insert or update status rows (keys: source, scan_id, status, reason, file_size, file_mtime_ns) in
        one statement; each update counts one more attempt. Sources must be unique within ``rows``."""
        if not rows:
            return
        if len({r["source"] for r in rows}) != len(rows):
            raise ValueError("record_statuses: a source occurs twice in one call")
        table = pa.table(
            {
                "source": pa.array([r["source"] for r in rows], pa.string()),
                "scan_id": pa.array([r.get("scan_id") for r in rows], pa.string()),
                "status": pa.array([r["status"] for r in rows], pa.string()),
                "reason": pa.array([r.get("reason") for r in rows], pa.string()),
                "file_size": pa.array([r.get("file_size") for r in rows], pa.int64()),
                "file_mtime_ns": pa.array([r.get("file_mtime_ns") for r in rows], pa.int64()),
            }
        )
        self.con.register("_status_in", table)
        try:
            self.con.execute(
                "INSERT INTO scan_status (collection_id, source, scan_id, status, reason, attempts, file_size, "
                "file_mtime_ns) SELECT ?, source, scan_id, status, reason, 1, file_size, file_mtime_ns "
                "FROM _status_in ON CONFLICT (collection_id, source) DO UPDATE SET "
                "scan_id = excluded.scan_id, status = excluded.status, reason = excluded.reason, "
                "attempts = scan_status.attempts + 1, file_size = excluded.file_size, "
                "file_mtime_ns = excluded.file_mtime_ns, updated_at = now()",
                [collection.collection_id],
            )
        finally:
            self.con.unregister("_status_in")

    def failures(self, collection: Collection) -> list[tuple[str, str]]:
        return self.con.execute(
            "SELECT source, reason FROM scan_status WHERE collection_id = ? AND status = 'failed' ORDER BY source",
            [collection.collection_id],
        ).fetchall()

    # -- vectors -------------------------------------------------------------------------------------------
    def add_embeddings(self, collection: Collection, *, scan_ids: Sequence[str], vectors: np.ndarray) -> np.ndarray:
        """Store ``vectors [N, dim]`` for ``scan_ids`` (replacing older vectors of the same scans).

        Returns the new int64 ids ``[N]`` in input order. One transaction (or part of the caller's).
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != collection.dim:
            raise ModelMismatchError(
                f"vectors of shape {vectors.shape} do not fit {collection.model_id} (dim {collection.dim})"
            )
        if len(scan_ids) != len(vectors):
            raise ValueError("scan_ids and vectors differ in length")
        if len(scan_ids) == 0:
            return np.zeros(0, np.int64)
        table = pa.table(
            {
                "scan_id": list(scan_ids),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), collection.dim),
            }
        )
        self.con.register("_vec_in", table)
        try:
            with self.transaction():
                self.con.execute(f"DELETE FROM {collection.table} WHERE scan_id IN (SELECT scan_id FROM _vec_in)")
                rows = self.con.execute(
                    f"INSERT INTO {collection.table} (scan_id, vector) SELECT scan_id, vector FROM _vec_in "
                    "RETURNING id, scan_id"
                ).fetchall()
        finally:
            self.con.unregister("_vec_in")
        by_scan = {scan_id: vid for vid, scan_id in rows}
        return np.array([by_scan[s] for s in scan_ids], dtype=np.int64)

    def delete_embeddings(self, collection: Collection, *, scan_ids: Sequence[str]) -> int:
        """Remove the vectors of ``scan_ids`` (e.g. a changed file that no longer loads); returns how many."""
        if not scan_ids:
            return 0
        table = pa.table({"scan_id": list(scan_ids)})
        self.con.register("_del_in", table)
        try:
            before = self.count(collection)
            self.con.execute(f"DELETE FROM {collection.table} WHERE scan_id IN (SELECT scan_id FROM _del_in)")
            return before - self.count(collection)
        finally:
            self.con.unregister("_del_in")

    def archive_roots(self, scan_ids: Sequence[str]) -> dict[str, str]:
        """``{scan_id: archive_root}`` for stored scans among ``scan_ids`` that record their archive."""
        if not scan_ids:
            return {}
        table = pa.table({"scan_id": list(scan_ids)})
        self.con.register("_roots_in", table)
        try:
            rows = self.con.execute(
                "SELECT s.scan_id, s.archive_root FROM scans s JOIN _roots_in r ON r.scan_id = s.scan_id "
                "WHERE s.archive_root IS NOT NULL"
            ).fetchall()
        finally:
            self.con.unregister("_roots_in")
        return {r[0]: r[1] for r in rows}

    def ids(self, collection: Collection) -> np.ndarray:
        """All vector ids of a collection, sorted, int64 ``[N]``."""
        tab = self.con.sql(f"SELECT id FROM {collection.table} ORDER BY id").to_arrow_table()
        return np.asarray(tab.column("id").to_numpy(), dtype=np.int64)

    def vectors(self, collection: Collection) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(ids [N] int64, X [N, dim] float32, scan_ids)``, ordered by id."""
        tab = self.con.sql(f"SELECT id, scan_id, vector FROM {collection.table} ORDER BY id").to_arrow_table()
        ids = np.asarray(tab.column("id").to_numpy(), dtype=np.int64)
        vec = tab.column("vector").combine_chunks()
        if len(vec) == 0:
            return ids, np.zeros((0, collection.dim), np.float32), []
        flat = np.asarray(vec.values.to_numpy(zero_copy_only=False), dtype=np.float32)
        return ids, flat.reshape(-1, collection.dim), tab.column("scan_id").to_pylist()

    def vector_of(self, collection: Collection, *, scan_id: str) -> tuple[int, np.ndarray]:
        row = self._one(f"SELECT id, vector FROM {collection.table} WHERE scan_id = ?", [scan_id])
        if row is None:
            raise StoreError(f"scan {scan_id} has no vector for model {collection.model_id}")
        return int(row[0]), np.asarray(row[1], dtype=np.float32)

    def scans_for_ids(self, collection: Collection, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """``{id: {scan_id, patient_id, source, path}}`` for vector ids; ``path`` is the scan's file when the
        archive it was embedded from is known, else None."""
        if len(ids) == 0:
            return {}
        table = pa.table({"id": pa.array(list(ids), pa.int64())})
        self.con.register("_ids_in", table)
        try:
            rows = self.con.execute(
                "SELECT e.id, e.scan_id, s.patient_id, s.source, s.archive_root "
                f"FROM _ids_in i JOIN {collection.table} e ON e.id = i.id LEFT JOIN scans s ON s.scan_id = e.scan_id"
            ).fetchall()
        finally:
            self.con.unregister("_ids_in")
        return {
            int(r[0]): {
                "scan_id": r[1],
                "patient_id": r[2],
                "source": r[3],
                "path": str(Path(r[4]) / r[3]) if r[4] and r[3] else None,
            }
            for r in rows
        }

    def count(self, collection: Collection) -> int:
        return int(self._one(f"SELECT count(*) FROM {collection.table}")[0])
