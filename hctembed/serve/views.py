"""One collection as a server holds it: the collection's saved FAISS index (exact, HNSW, IVF or IVF-PQ, loaded from
its file as ``embed`` / ``index build`` left it), or, when there is none that matches the database, an exact one
built from the vectors; and the ids that name its hits.

The live feed's additions go into the index as they are committed (every kind takes adds). Removals (and a
scan's replaced vector) leave the flat index at once; an approximate index keeps them as tombstones, filtered out
of every answer, until they pass :data:`REBUILD_SHARE` of the index, when the poll thread rebuilds it from its own
live vectors (same factory and search parameters) and swaps it in whole; a newer snapshot with its saved index
replaces everything anyway. Nothing but the index holds the vectors: no float copy at start-up.

Memory per vector of dim ``d`` (float32), as FAISS stores it: flat ``4d`` bytes; HNSW ``4d + 8M`` (M neighbours
at level 0, ``2M`` links of 4 bytes); IVF-Flat ``4d + 8`` (the id in its list); IVF-PQ with exact re-ranking
``d/8 + 4d + 8`` (codes, the flat vectors it re-ranks against, the id); plus 8 bytes of id map and the server's
two dictionaries (scan id <-> id, ~150 bytes a scan).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from hctembed.index.choice import EXACT_FACTORY, set_search_params
from hctembed.index.vectors import IndexInvalid, index_name, load_index, stale_reason

log = logging.getLogger(__name__)

REBUILD_SHARE = 0.05  # tombstones past this share of an approximate index (and at least REBUILD_MIN): rebuild
REBUILD_MIN = 1000


@dataclass
class CollectionView:
    """One model's index keyed by the stored ids; ``kind`` exact | hnsw | ivf | ivfpq, ``name`` as answers say it
    (``flat``, ``hnsw48``, ...); ``removed``: tombstoned ids still inside an approximate index."""

    collection_id: int
    model_id: str
    fingerprint: str
    dim: int
    windows: list[dict]
    index: Any
    id_of: dict[str, int] = field(default_factory=dict)
    scan_of: dict[int, str] = field(default_factory=dict)
    last_embedded: float = 0.0
    planes: dict[str, bytes] = field(default_factory=dict)  # from the live feed (the snapshot holds the rest)
    kind: str = "exact"
    factory: str = EXACT_FACTORY
    search_params: dict = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)
    source: str = "built from the database's vectors"  # or "the saved index file"

    @classmethod
    def empty(cls, *, collection_id: int, model_id: str, fingerprint: str, dim: int, windows=()) -> CollectionView:
        return cls(collection_id, model_id, fingerprint, dim, list(windows), faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @property
    def name(self) -> str:
        return index_name(self.factory)

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    @property
    def live(self) -> int:
        """Vectors the index answers with (tombstones left out)."""
        return int(self.index.ntotal) - len(self.removed)

    def answer(self) -> dict[str, Any]:
        """What every answer says about the index that produced it."""
        return {"index": self.name, "exact": self.exact}

    def add(self, ids: np.ndarray, scan_ids: list[str], vectors: np.ndarray) -> None:
        """``vectors [n, dim]``; a scan's new vector replaces its old one."""
        self.remove([s for s in scan_ids if s in self.id_of])
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))
        self.id_of.update(zip(scan_ids, (int(i) for i in ids), strict=True))
        self.scan_of.update(zip((int(i) for i in ids), scan_ids, strict=True))

    def remove(self, scan_ids: list[str]) -> None:
        gone = [self.id_of.pop(s) for s in scan_ids if s in self.id_of]
        for vid in gone:
            self.scan_of.pop(vid, None)
        if not gone:
            return
        if self.exact:
            self.index.remove_ids(np.asarray(gone, np.int64))
        else:  # graphs and inverted lists keep them until the next rebuild; answers skip them
            self.removed.update(gone)

    def search(self, xq: np.ndarray, *, k: int, exclude: int | None) -> list[tuple[float, int]]:
        """The top ``k`` (score, id) of ``xq [dim]``, without ``exclude`` and tombstones, best first."""
        if self.live <= 0:
            return []
        extra = (1 if exclude is not None else 0) + len(self.removed)
        want = min(k + extra, int(self.index.ntotal))
        scores, ids = self.index.search(np.ascontiguousarray(xq[None], np.float32), want)
        out = []
        for score, vid in zip(scores[0], ids[0], strict=True):
            vid = int(vid)
            if vid < 0 or vid == exclude or vid in self.removed or vid not in self.scan_of:
                continue
            out.append((float(score), vid))
            if len(out) == k:
                break
        return out

    def query_vector(self, vid: int) -> np.ndarray | None:
        """The stored vector of id ``vid`` from the index (None where this kind cannot give it back)."""
        try:
            return np.asarray(self.index.reconstruct(int(vid)), np.float32)
        except RuntimeError:
            return None

    def needs_rebuild(self) -> bool:
        return bool(self.removed) and len(self.removed) >= max(REBUILD_MIN, REBUILD_SHARE * int(self.index.ntotal))

    def rebuilt(self) -> Any:
        """A new index of the same factory and search parameters holding only the live vectors (the caller swaps
        it in). Holds a second copy of the vectors while it builds."""
        inner = faiss.downcast_index(self.index.index)
        everything = inner.reconstruct_n(0, int(inner.ntotal))
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        keep = ~np.isin(ids, np.fromiter(self.removed, np.int64, len(self.removed)))
        index = faiss.index_factory(self.dim, self.factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(everything[keep])
        index.add_with_ids(np.ascontiguousarray(everything[keep]), ids[keep])
        set_search_params(index, self.search_params)
        return index


def saved_view(collection, *, index_folder: Path, exact: bool) -> CollectionView:
    """The view of a snapshot's ``collection``: its saved index from ``index_folder`` (the database's ``.faiss``
    folder) when that holds exactly the collection's rows (and, with ``exact``, is exact); else an exact index built
    from the vectors, with why in the log."""
    view = CollectionView.empty(
        collection_id=collection.collection_id, model_id=collection.model_id, fingerprint=collection.fingerprint,
        dim=collection.dim, windows=collection.preprocess().get("windows") or (),
    )  # fmt: skip
    stem = f"c{collection.collection_id}"
    index_path, manifest_path = index_folder / f"{stem}.faiss", index_folder / f"{stem}.json"
    reason = None
    if index_path.exists():
        try:
            saved, manifest = load_index(index_path=index_path, manifest_path=manifest_path)
            reason = stale_reason(manifest, collection=collection, store_id=collection.store.store_id,
                                  rows=collection.rows_digest())  # fmt: skip
            if reason is None and exact and manifest.kind != "exact":
                reason = f"--exact asked for, the saved index is {manifest.kind}"
        except IndexInvalid as exc:
            reason = str(exc)
        if reason is None:
            ids, scan_ids = collection.keys()
            view.index, view.kind, view.factory = saved.index, manifest.kind, manifest.factory
            view.search_params = dict(manifest.search_params)
            view.id_of = dict(zip(scan_ids, ids.tolist(), strict=True))
            view.scan_of = dict(zip(ids.tolist(), scan_ids, strict=True))
            view.source = "the saved index file"
            return view
        log.info("%s: not using the saved index (%s); exact search over the stored vectors", collection.model_id,
                 reason)  # fmt: skip
        view.source = f"built from the database's vectors (the saved index: {reason})"
    ids, vectors, scan_ids = collection.vectors()
    if len(ids):
        view.add(ids, list(scan_ids), vectors)
    return view
