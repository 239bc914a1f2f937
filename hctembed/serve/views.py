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
from typing import Any

import faiss
import numpy as np

from hctembed.index.choice import EXACT_FACTORY, set_search_params
from hctembed.index.store import SidecarPaths
from hctembed.index.vectors import IndexInvalid, index_name, load_index, stale_reason
from hctembed.search import ranked_pairs

log = logging.getLogger(__name__)

REBUILD_SHARE = 0.05  # tombstones past this share of an approximate index (and at least REBUILD_MIN): rebuild
REBUILD_MIN = 1000


class KeyMap:
    """Scan id <-> vector id of one collection, for a million scans without two Python dictionaries (~350 MB):
    the snapshot's keys as sorted numpy arrays (~150 MB at 10⁶), what the live feed adds or removes since in small
    dictionaries beside them."""

    def __init__(self, ids: np.ndarray | None = None, scan_ids: list[str] | None = None) -> None:
        ids = np.asarray(ids if ids is not None else [], np.int64)
        scans = np.asarray(scan_ids if scan_ids is not None else [], dtype=str)
        order = np.argsort(ids, kind="stable")
        self._ids, self._scans = ids[order], scans[order]  # by id
        by_scan = np.argsort(self._scans, kind="stable")
        self._sorted_scans, self._ids_by_scan = self._scans[by_scan], self._ids[by_scan]  # by scan id
        self._added: dict[str, int] = {}
        self._added_rev: dict[int, str] = {}
        self._gone: set[int] = set()  # snapshot ids removed since

    def _base_id(self, scan_id: str) -> int | None:
        at = int(np.searchsorted(self._sorted_scans, scan_id))
        if at < len(self._sorted_scans) and self._sorted_scans[at] == scan_id:
            vid = int(self._ids_by_scan[at])
            return None if vid in self._gone else vid
        return None

    def id_of(self, scan_id: str) -> int | None:
        if scan_id in self._added:
            return self._added[scan_id]
        return self._base_id(scan_id)

    def scan_of(self, vid: int) -> str | None:
        if vid in self._added_rev:
            return self._added_rev[vid]
        if vid in self._gone:
            return None
        at = int(np.searchsorted(self._ids, vid))
        return str(self._scans[at]) if at < len(self._ids) and int(self._ids[at]) == vid else None

    def add(self, scan_id: str, vid: int) -> None:
        self._added[scan_id] = vid
        self._added_rev[vid] = scan_id

    def remove(self, scan_id: str) -> int | None:
        """Forget ``scan_id``; its id, or None when it was not there."""
        if scan_id in self._added:
            vid = self._added.pop(scan_id)
            self._added_rev.pop(vid, None)
            return vid
        vid = self._base_id(scan_id)
        if vid is not None:
            self._gone.add(vid)
        return vid


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
    keys: KeyMap = field(default_factory=KeyMap)
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

    def id_of(self, scan_id: str) -> int | None:
        return self.keys.id_of(scan_id)

    def scan_of(self, vid: int) -> str | None:
        return self.keys.scan_of(vid)

    def add(self, ids: np.ndarray, scan_ids: list[str], vectors: np.ndarray) -> None:
        """``vectors [n, dim]``; a scan's new vector replaces its old one."""
        self.remove(list(scan_ids))
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))
        for scan_id, vid in zip(scan_ids, ids, strict=True):
            self.keys.add(scan_id, int(vid))

    def remove(self, scan_ids: list[str]) -> None:
        gone = [vid for s in scan_ids if (vid := self.keys.remove(s)) is not None]
        if not gone:
            return
        if self.exact:
            self.index.remove_ids(np.asarray(gone, np.int64))
        else:  # graphs and inverted lists keep them until the next rebuild; answers skip them
            self.removed.update(gone)

    def search(self, xq: np.ndarray, *, k: int, exclude: int | None) -> list[tuple[float, int]]:
        """The top ``k`` (score, id) of ``xq [dim]``, without ``exclude`` and tombstones, best first: the CLI's
        ranking (:func:`hctembed.search.ranked_pairs`) over ``k`` more results per tombstone."""
        if self.live <= 0:
            return []
        extra = (1 if exclude is not None else 0) + len(self.removed)
        scores, ids = self.index.search(np.ascontiguousarray(xq[None], np.float32), min(k + extra, self.index.ntotal))
        if self.removed:  # tombstoned ids read as FAISS's padding (-1), which the ranking drops
            ids = np.where(np.isin(ids, np.fromiter(self.removed, np.int64, len(self.removed))), -1, ids)
        return ranked_pairs(scores[0], ids[0], k=k, exclude_id=exclude)

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


def saved_view(collection, *, paths: SidecarPaths, exact: bool) -> CollectionView:
    """The view of a snapshot's ``collection``: its saved index (among the database's ``paths``) when that holds
    exactly the collection's rows (and, with ``exact``, is exact); else an exact index built from the vectors, with
    why in the log."""
    view = CollectionView.empty(
        collection_id=collection.collection_id, model_id=collection.model_id, fingerprint=collection.fingerprint,
        dim=collection.dim, windows=collection.preprocess().get("windows") or (),
    )  # fmt: skip
    index_path, manifest_path = paths.index_files(collection.collection_id)
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
            view.keys = KeyMap(ids, scan_ids)
            del scan_ids
            view.source = "the saved index file"
            return view
        log.info("%s: not using the saved index (%s); exact search over the stored vectors", collection.model_id,
                 reason)  # fmt: skip
        view.source = f"built from the database's vectors (the saved index: {reason})"
    ids, vectors, scan_ids = collection.vectors()
    if len(ids):
        view.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids)
        view.keys = KeyMap(ids, scan_ids)
    return view
