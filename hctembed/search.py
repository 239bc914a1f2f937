"""Query the index: by a scan file (embedded with the stored model and preprocessing) or by a stored scan."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hctembed.index.store import Collection, ModelMismatchError, Store
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
    """Rebuild the encoder a collection was embedded with (its weights file, or its architecture and seed for a
    random initialisation); refuses if the result is not bit for bit the stored model, or preprocesses
    otherwise."""
    return encoder_of(collection.model(), model_id=collection.model_id, fingerprint=collection.fingerprint)


def encoder_of(row, *, model_id: str, fingerprint: str) -> Encoder:
    """:func:`stored_encoder` from a collection's model row (``store.models.get``), its id and fingerprint."""
    from hctembed.errors import InputError
    from hctembed.model.encoders import rebuild_encoder

    try:
        encoder = rebuild_encoder(name=row.name, model_id=model_id, weights_path=row.weights_path, card=row.card)
    except InputError as exc:
        raise ModelMismatchError(f"cannot embed a query: {exc}") from None
    if encoder.fingerprint != fingerprint:
        raise ModelMismatchError(
            f"model {encoder.name} now preprocesses as {encoder.fingerprint}, but the index holds "
            f"vectors made with {fingerprint}"
        )
    return encoder


def embed_file(encoder: Encoder, path: str | Path, *, max_voxels: int | None = None, limits=None) -> np.ndarray:
    """One scan file -> L2-normalised ``[dim]``; refused (VolumeError) over ``max_voxels`` (its headers or its
    resampled grid) or the zip ``limits`` (:class:`hctembed.io.admission.Limits`) before anything of that size is
    read."""
    from hctembed.embedding.loading import usable_vectors
    from hctembed.preprocessing.series import prepare_file
    from hctembed.volume import MAX_VOXELS, VolumeError

    x = prepare_file(path, config=encoder.preprocess, max_voxels=max_voxels or MAX_VOXELS, limits=limits)
    vector = encoder.encode(x[None])
    usable, why = usable_vectors(vector)
    if not usable[0]:
        raise VolumeError(str(why[0]))
    return vector[0]


@dataclass(frozen=True)
class FileSearch:
    """A search by a scan file: its hits, and the stored scan whose vector the file's equals (the file is that
    scan, by content), or None."""

    hits: list[Hit]
    stored_as: str | None


def search_file(store: Store, *, path: str | Path, k: int = 10, model: str | None = None) -> list[Hit]:
    return query_file(store, path=path, k=k, model=model).hits


def query_file(store: Store, *, path: str | Path, k: int = 10, model: str | None = None) -> FileSearch:
    """Embed the scan at ``path`` with the collection's encoder and find its ``k`` nearest stored scans."""
    collection = store.resolve_collection(model_id=model)
    encoder = stored_encoder(collection)
    xq = embed_file(encoder, path)
    hits = _search(collection, xq, k=k, exclude_id=None, fingerprint=encoder.fingerprint)
    return FileSearch(hits=hits, stored_as=_same_vector(collection, xq, hits))


def _same_vector(collection: Collection, xq: np.ndarray, hits: list[Hit]) -> str | None:
    """The first hit's scan id when its stored vector equals ``xq`` (to float rounding: the same file embedded
    again, on whatever thread count), else None."""
    if not hits or hits[0].score < 1 - 1e-5:
        return None
    _, stored = collection.vector_of(hits[0].scan_id)
    return hits[0].scan_id if np.allclose(stored, xq, rtol=0, atol=1e-5) else None


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
