"""Query the index: by a scan file (embedded with the stored model and preprocessing) or by a stored scan."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hctembed.index.store import Collection, ModelMismatchError, Store, StoreError
from hctembed.index.vectors import open_index

if TYPE_CHECKING:  # the model and preprocessing (torch) load only when a query file is embedded
    from hctembed.model.encoders import Encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rank: int
    score: float
    id: int
    scan_id: str
    patient_id: str | None
    labels: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "score": round(self.score, 6),
            "id": self.id,
            "scan_id": self.scan_id,
            "patient_id": self.patient_id,
            "labels": self.labels,
        }


def stored_encoder(collection: Collection) -> Encoder:
    """Reload the encoder a collection was embedded with; refuses if the weights changed on disk."""
    from hctembed.model.encoders import load_encoder

    row = collection.model()
    if not row.weights_path:
        raise StoreError(f"model {collection.model_id} has no weights file recorded; cannot embed a query")
    if not Path(row.weights_path).exists():
        raise StoreError(f"weights of {collection.model_id} not found at {row.weights_path}")
    encoder = load_encoder(row.name, weights=row.weights_path)
    if encoder.model_id != collection.model_id:
        raise ModelMismatchError(
            f"weights at {row.weights_path} are now model {encoder.model_id}, but the index holds "
            f"model {collection.model_id}"
        )
    if encoder.fingerprint != collection.fingerprint:
        raise ModelMismatchError(
            f"model {encoder.name} now preprocesses as {encoder.fingerprint}, but the index holds "
            f"vectors made with {collection.fingerprint}"
        )
    return encoder


def embed_file(encoder: Encoder, path: str | Path) -> np.ndarray:
    """One scan file -> L2-normalised ``[dim]``."""
    from hctembed.io.archive import load_volume
    from hctembed.preprocessing import preprocess

    x = preprocess(load_volume(path), config=encoder.preprocess)
    return encoder.encode(x[None])[0]


def search_file(store: Store, *, path: str | Path, k: int = 10, model: str | None = None) -> list[Hit]:
    collection = store.resolve_collection(model_id=model)
    encoder = stored_encoder(collection)
    xq = embed_file(encoder, path)
    return _search(collection, xq, k=k, exclude_id=None, fingerprint=encoder.fingerprint)


def search_id(store: Store, *, scan_id: str, k: int = 10, model: str | None = None) -> list[Hit]:
    """Neighbours of a stored scan (the scan itself excluded)."""
    collection = store.resolve_collection(model_id=model)
    vid, xq = collection.vector_of(scan_id)
    return _search(collection, xq, k=k, exclude_id=vid, fingerprint=collection.fingerprint)


def ranked_pairs(scores: np.ndarray, ids: np.ndarray, *, k: int, exclude_id: int | None) -> list[tuple[float, int]]:
    """The first ``k`` ``(score, id)`` of one query's result row (``scores [n]``, ``ids [n]``, n = k, or k + 1
    when the query's own ``exclude_id`` is to be left out), FAISS's padding (-1) dropped. Shared by the CLI
    and the server, so both rank alike."""
    return [(float(s), int(i)) for s, i in zip(scores, ids, strict=True) if i >= 0 and i != exclude_id][:k]


def _search(collection: Collection, xq, *, k, exclude_id, fingerprint) -> list[Hit]:
    index = open_index(collection)
    extra = 1 if exclude_id is not None else 0
    result = index.search(xq[None], k=k + extra, model_id=collection.model_id, fingerprint=fingerprint)
    pairs = ranked_pairs(result.D[0], result.I[0], k=k, exclude_id=exclude_id)
    rows = collection.hits([i for _, i in pairs])
    labels = collection.store.labels.of([rows[i].scan_id for _, i in pairs if i in rows])
    hits = []
    for rank, (score, vid) in enumerate(pairs, start=1):
        row = rows.get(vid)
        scan_id, patient_id = (row.scan_id, row.patient_id) if row else (f"<id {vid}>", None)
        hits.append(Hit(rank, score, vid, scan_id, patient_id, labels.get(scan_id, {})))
    return hits
