"""The Parquet parts of a sharded run (see :mod:`hctembed.embedding.shards`): each rank's outcomes written as whole
files under ``parts/`` (a temporary name, then a rename), and read back in the order of the run's list."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hctembed.embedding.loading import Outcome
from hctembed.index.store import StatusRow
from hctembed.index.store.parts import sorted_parts

log = logging.getLogger(__name__)

PARTS = "parts"
MERGE_CHUNK = 2048  # outcomes per merge transaction (one DuckDB vector: ids follow the input order)
SORT_MEMORY = "1GB"  # what sorting the parts may hold in memory before spilling to disk


def part_rows(folder: Path) -> int:
    """How many outcomes the folder's parts hold (from the Parquet footers)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in part_files(folder))


def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("position", pa.int64()),
            ("source", pa.string()),
            ("scan_id", pa.string()),
            ("status", pa.string()),
            ("reason", pa.string()),
            ("file_size", pa.int64()),
            ("file_mtime_ns", pa.int64()),
            ("patient_id", pa.string()),
            ("format", pa.string()),
            ("meta", pa.string()),
            ("planes", pa.binary()),
            ("vector", pa.list_(pa.float32(), dim)),
        ]
    )


def part_files(folder: Path) -> list[Path]:
    parts = folder / PARTS
    return sorted(parts.glob("rank*.parquet")) if parts.is_dir() else []


class PartWriter:
    """Buffers one rank's outcomes and writes them as whole Parquet parts (temporary name, then rename)."""

    def __init__(self, folder: Path, *, rank: int, dim: int, rows_per_part: int) -> None:
        self.dir = folder / PARTS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.dim, self.rows_per_part = rank, dim, rows_per_part
        mine = sorted(self.dir.glob(f"rank{rank:04d}-*.parquet"))
        self.seq = int(mine[-1].stem.split("-")[1]) if mine else 0
        self.outcomes: list[Outcome] = []
        self.vectors: list[np.ndarray] = []

    def add(self, outcomes: Sequence[Outcome], vectors: np.ndarray) -> None:
        """``vectors [n_embedded, dim]``: those of the embedded outcomes, in order."""
        it = iter(vectors)
        for o in outcomes:
            self.outcomes.append(o)
            self.vectors.append(next(it) if o.status == "embedded" else None)
        if len(self.outcomes) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if not self.outcomes:
            return
        columns: dict[str, list] = {f.name: [getattr(o, f.name) for o in self.outcomes] for f in fields(Outcome)}
        columns["meta"] = [json.dumps(m, default=str) for m in columns["meta"]]
        flat = np.zeros((len(self.outcomes), self.dim), np.float32)
        valid = np.array([v is not None for v in self.vectors])
        if valid.any():
            flat[valid] = np.stack([v for v in self.vectors if v is not None])
        vector = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), self.dim, mask=pa.array(~valid))
        table = pa.table({**{k: columns[k] for k in _schema(self.dim).names[:-1]}, "vector": vector})
        table = table.cast(_schema(self.dim))
        self.seq += 1
        path = self.dir / f"rank{self.rank:04d}-{self.seq:06d}.parquet"
        tmp = self.dir / f".{path.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        log.debug("rank %d wrote %s (%d rows)", self.rank, path.name, len(self.outcomes))
        self.outcomes, self.vectors = [], []


def done_in_parts(folder: Path) -> dict[str, StatusRow]:
    """``{source: StatusRow}`` of every outcome already in the folder's parts (the latest one wins)."""
    done: dict[str, StatusRow] = {}
    for path in part_files(folder):
        cols = ["source", "scan_id", "status", "reason", "file_size", "file_mtime_ns"]
        for r in pq.read_table(path, columns=cols).to_pylist():
            done[r["source"]] = StatusRow(
                r["source"], r["scan_id"], r["status"], r["reason"], 1, r["file_size"], r["file_mtime_ns"]
            )
    return done


def read_parts(folder: Path, *, dim: int) -> Iterator[tuple[list[Outcome], np.ndarray]]:
    """Every outcome in the folder's parts in position order, in chunks of at most :data:`MERGE_CHUNK`, with
    the vectors ``[n_embedded, dim]`` of the embedded ones. A position written twice (a part re-written after
    a retry) keeps its latest outcome.

    The parts are sorted by an in-memory DuckDB of their own, which streams the result and spills to
    ``folder/.merge-tmp`` beyond its memory limit, so the merge's memory does not grow with the archive.
    """
    # within a rank, later parts (higher sequence numbers in the file name) are newer
    batches = sorted_parts(
        part_files(folder),
        key="position",
        temp_dir=folder / ".merge-tmp",
        memory_limit=SORT_MEMORY,
        batch_rows=MERGE_CHUNK,
    )
    for batch in batches:
        for start in range(0, batch.num_rows, MERGE_CHUNK):
            yield _outcomes(batch.slice(start, MERGE_CHUNK), dim=dim)


def _outcomes(batch: pa.RecordBatch, *, dim: int) -> tuple[list[Outcome], np.ndarray]:
    known = {f.name for f in fields(Outcome)}  # parts of earlier versions had path columns: left unread
    columns = [name for name in batch.schema.names if name != "vector" and name in known]
    rows = pa.Table.from_batches([batch]).select(columns).to_pylist()
    outcomes = [Outcome(**{**r, "meta": json.loads(r["meta"] or "{}")}) for r in rows]
    vec = batch.column("vector")
    valid = np.asarray(vec.is_valid())
    values = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return outcomes, np.ascontiguousarray(values[valid] if len(values) == len(valid) else values, dtype=np.float32)
