"""``precomputed``: vectors made elsewhere (e.g. Google CT Foundation's 1408-d embeddings) imported as their
own collection, so every benchmark treats them like any other model. No encoder runs; queries by file are
not possible for such a collection (search by stored scan id works).

Input: ``.parquet`` with a ``scan_id`` column and a ``vector``/``embedding`` list column, or ``.npy``
``[N, D]`` with ``FILE.scan_ids.txt`` beside it (one scan id per line, in row order).
The model id is ``precomputed-<name>-<12 hex of the vectors' sha256>``; the preprocessing fingerprint is
``external``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hctembed.errors import HctembedError
from hctembed.index.choice import IndexOptions
from hctembed.index.store import ModelRow, Store
from hctembed.index.vectors import open_index

FINGERPRINT = "external"


class VectorsFileError(HctembedError, ValueError):
    """A vectors file that cannot be imported; the message says why."""


@dataclass(frozen=True)
class Imported:
    model_id: str
    scan_ids: list[str]
    vectors: np.ndarray  # [N, D] float32, L2-normalised
    digest: str


def read_vectors(path: str | Path, *, name: str) -> Imported:
    path = Path(path)
    if not path.exists():
        raise VectorsFileError(f"vectors file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises its own types for a file that is not Parquet
            raise VectorsFileError(f"{path} is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        column = next((c for c in ("vector", "embedding") if c in table.column_names), None)
        if "scan_id" not in table.column_names or column is None:
            raise VectorsFileError(f"{path}: needs columns scan_id and vector (or embedding); has {table.column_names}")
        scan_ids = [str(s) for s in table.column("scan_id").to_pylist()]
        vectors = np.asarray(table.column(column).to_pylist(), dtype=np.float32)
    elif path.suffix == ".npy":
        ids_file = path.with_suffix(".scan_ids.txt")
        if not ids_file.exists():
            raise VectorsFileError(f"{path}: needs {ids_file.name} beside it (one scan id per line, in row order)")
        try:
            vectors = np.load(path, allow_pickle=False).astype(np.float32)
        except (ValueError, OSError) as exc:
            raise VectorsFileError(f"{path} is not a plain .npy array ({exc})") from None
        scan_ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    else:
        raise VectorsFileError(f"{path}: use .parquet (scan_id, vector) or .npy with .scan_ids.txt")
    if vectors.ndim != 2 or vectors.shape[0] != len(scan_ids) or vectors.shape[0] == 0:
        raise VectorsFileError(f"{path}: {len(scan_ids)} scan ids but vectors of shape {vectors.shape}")
    if len(set(scan_ids)) != len(scan_ids):
        raise VectorsFileError(f"{path}: duplicate scan ids")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(vectors)) or np.any(norms == 0):
        raise VectorsFileError(f"{path}: non-finite or all-zero vectors")
    vectors = vectors / norms
    digest = hashlib.sha256(np.ascontiguousarray(vectors).tobytes() + "\n".join(scan_ids).encode()).hexdigest()
    return Imported(f"precomputed-{name}-{digest[:12]}", scan_ids, vectors, digest)


def import_vectors(store: Store, imported: Imported, *, name: str, source: str, index_kind: str | None = None) -> int:
    """Write ``imported`` as its own collection (model ``precomputed``) and build its index (``index_kind``: one of
    :data:`hctembed.index.choice.KINDS`; None keeps the saved kind, auto for a new one); returns the number of
    vectors."""
    dim = int(imported.vectors.shape[1])
    with store.transaction():
        store.models.register(
            ModelRow(
                model_id=imported.model_id,
                name="precomputed",
                dim=dim,
                config={"name": name, "source": source},
                weights_path=None,
                weights_digest=imported.digest,
                card={"origin": "external vectors", "file": source},
            )
        )
        coll = store.collection(model_id=imported.model_id, fingerprint=FINGERPRINT, dim=dim, preprocess={})
        store.scans.add_missing(imported.scan_ids, format="external")
        coll.add(scan_ids=imported.scan_ids, vectors=imported.vectors)
    open_index(coll, quiet=True, options=IndexOptions(kind=index_kind) if index_kind else None)
    return len(imported.scan_ids)
