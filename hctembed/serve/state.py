"""What a server holds: every collection's vectors in an in-memory FAISS index, every scan's patient, labels and
facts, loaded once from the database's newest snapshot (:mod:`hctembed.index.store.snapshot`) and kept
current from the live feed (:mod:`hctembed.index.live_feed`) while an ``embed`` writes; encoders load once, on
the first query file. A background thread beats the server's heartbeat (so writers feed it), applies new
feed files every ``poll_s`` seconds, loads a newer snapshot aside and swaps it in whole, and takes a snapshot
itself when the database changed and no writer holds it. Requests never open the database itself, so they
never meet its lock; they open only snapshot files, which never change under their names.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hctembed.errors import InputError
from hctembed.index.live_feed import LiveFeed, read_new
from hctembed.index.store import SidecarPaths, Store, StoreError
from hctembed.index.store.snapshot import latest_snapshot, snapshot_time, take_snapshot
from hctembed.search import Hit
from hctembed.serve.views import CollectionView, saved_view

log = logging.getLogger(__name__)


class NotFound(InputError):
    """An unknown scan id (HTTP 404)."""


@dataclass
class Catalogue:
    """Everything requests read: the views and the scans' facts, as of one snapshot plus the feed since."""

    views: dict[int, CollectionView]  # by collection id (one model may have several preprocessings)
    patients: dict[str, str | None]
    labels: dict[str, dict[str, float]]
    facts: dict[str, dict[str, Any]]
    snapshot: Path | None
    since: int  # time_ns of the snapshot: feed files from then on are applied on top


class ServerState:
    """The catalogue of one database and the thread that keeps it current; thread-safe."""

    def __init__(self, db: Path, *, poll_s: float = 2.0, exact: bool = False) -> None:
        self.db = Path(db)
        self.exact = exact  # exact search whatever index the collections saved
        self.paths = SidecarPaths(self.db)
        self.poll_s = poll_s
        self.feed = LiveFeed(self.paths.live, like=self.db)
        self.lock = threading.RLock()
        self.catalogue = Catalogue({}, {}, {}, {}, None, 0)
        self._seen: set[str] = set()
        self._db_seen: tuple | None = None  # the database's file signature when last found in a snapshot
        self._encoders: dict[int, Any] = {}
        self._encoder_lock = threading.Lock()
        self._reader_lock = threading.Lock()
        self._snapshot_store: tuple[Path, Store] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Attach to the database (a heartbeat in its live feed folder), load what there is, start polling."""
        if not self.db.exists() and latest_snapshot(self.db) is None:
            raise StoreError(f"no database at {self.db}; run `hctembed embed ARCHIVE --db {self.db}` first")
        self.feed.beat()
        self.refresh()
        self._thread = threading.Thread(target=self._poll, name="hctembed-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling, say goodbye to writers (the heartbeat goes), close the snapshot connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.feed.detach()
        with self._reader_lock:
            if self._snapshot_store is not None:
                self._snapshot_store[1].close()
                self._snapshot_store = None

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # the server keeps answering from what it has
                log.warning("refreshing from %s failed; serving what was loaded", self.db.name, exc_info=True)

    def refresh(self) -> None:
        """Beat; take a snapshot if the database changed since the last one and no writer holds it; load a newer
        snapshot; apply the feed files written since it."""
        self.feed.beat()
        seen = _signature(self.db) if self.db.exists() else self._db_seen
        if seen != self._db_seen and take_snapshot(self.db) is not None:  # None while a writer holds it
            self._db_seen = seen
        newest = latest_snapshot(self.db)
        if newest is not None and newest != self.catalogue.snapshot:
            catalogue = load_catalogue(newest, paths=self.paths, exact=self.exact)  # aside, then swapped in whole
            with self.lock:
                self.catalogue, self._seen = catalogue, set()
            log.info("loaded %s: %d scans", newest.name, len(catalogue.facts))
        for batch in read_new(self.feed.folder, seen=self._seen, since=self.catalogue.since):
            try:
                with self.lock:
                    apply_batch(self.catalogue, batch.rows)
            except Exception:  # one bad file must not stop the others
                log.warning("could not apply live feed file %s", batch.name, exc_info=True)
        for view in list(self.catalogue.views.values()):
            if view.needs_rebuild():  # built aside (requests keep reading the old one), swapped in whole
                log.info("%s: rebuilding its %s index without %d removed vectors", view.model_id, view.name,
                         len(view.removed))  # fmt: skip
                index = view.rebuilt()
                with self.lock:
                    view.index, view.removed = index, set()

    # -- queries --------------------------------------------------------------------------------------
    def view(self, model: str | None) -> CollectionView:
        """The view of ``model`` (an id prefix), else the most recently embedded one (as the CLI chooses)."""
        with self.lock:
            views = list(self.catalogue.views.values())
        if model is not None:
            views = [v for v in views if v.model_id == model] or [v for v in views if v.model_id.startswith(model)]
            if len({v.model_id for v in views}) > 1:
                raise InputError(f"model {model} matches several models; give more of it")
        if not views:
            raise InputError(f"no embeddings for model {model}" if model else "the database holds no embeddings yet")
        return max(views, key=lambda v: (v.last_embedded, v.collection_id))

    def search_id(self, scan_id: str, *, k: int, model: str | None = None) -> tuple[CollectionView, list[Hit]]:
        with self.lock:
            view = self.view(model)
            vid = view.id_of(scan_id)
            if vid is None:
                if scan_id not in self.catalogue.facts:
                    raise NotFound(f"no such scan: {scan_id!r}")
                raise InputError(f"scan {scan_id} has no vector for model {view.model_id}")
            xq = view.query_vector(vid)
        if xq is None:  # a kind that cannot give a vector back (IVF without a direct map): from the snapshot
            xq = self._stored_vector(view, scan_id)
        with self.lock:
            return view, self._search(view, xq, k=k, exclude=vid)

    def search_vector(self, xq: np.ndarray, *, view: CollectionView, k: int) -> list[Hit]:
        with self.lock:
            return self._search(view, xq, k=k, exclude=None)

    def _stored_vector(self, view: CollectionView, scan_id: str) -> np.ndarray:
        with self._reader_lock:
            store = self._reader(self.catalogue.snapshot) if self.catalogue.snapshot is not None else None
            if store is None:
                raise InputError(f"scan {scan_id}'s vector is not in a snapshot yet; try again shortly")
            return store.collection(model_id=view.model_id, fingerprint=view.fingerprint).vector_of(scan_id)[1]

    def _search(self, view: CollectionView, xq: np.ndarray, *, k: int, exclude: int | None) -> list[Hit]:
        pairs = view.search(xq, k=k, exclude=exclude)
        cat = self.catalogue
        hits = []
        for rank, (score, vid) in enumerate(pairs, start=1):
            scan_id = view.scan_of(vid)
            hits.append(Hit(rank, score, vid, scan_id, cat.patients.get(scan_id), cat.labels.get(scan_id, {})))
        return hits

    def scan(self, scan_id: str) -> dict[str, Any]:
        """A scan's facts, labels and, per model, whether it has a vector."""
        with self.lock:
            cat = self.catalogue
            if scan_id not in cat.facts:
                raise NotFound(f"no such scan: {scan_id!r}")
            return {
                "scan_id": scan_id,
                "patient_id": cat.patients.get(scan_id),
                "labels": cat.labels.get(scan_id, {}),
                **cat.facts[scan_id],
                "embedded": {v.model_id: v.id_of(scan_id) is not None for v in cat.views.values()},
            }

    def planes(self, scan_id: str, *, model: str | None = None) -> tuple[bytes | None, list[dict]]:
        """The montage planes stored for a scan (from the feed, else from the snapshot) and the windows."""
        with self.lock:
            if scan_id not in self.catalogue.facts:
                raise NotFound(f"no such scan: {scan_id!r}")
            view = self.view(model)
            if scan_id in view.planes:
                return view.planes[scan_id], view.windows
            snapshot = self.catalogue.snapshot
        if snapshot is None:
            return None, view.windows
        with self._reader_lock:  # one connection to the snapshot, shared: DuckDB connections opened per request
            store = self._reader(snapshot)  # at once failed now and then (python_arrow_scan not found)
            if store is None:
                return None, view.windows
            found = store.collection(model_id=view.model_id, fingerprint=view.fingerprint).planes([scan_id])
        return found.get(scan_id), view.windows

    def _reader(self, snapshot: Path) -> Store | None:
        """The open read-only connection to ``snapshot`` (or, when it was replaced a moment ago, the newest one),
        opened once and kept while it is current: an open file stays readable after a newer snapshot deletes
        its name, so a request never loses the snapshot it started on. Call with ``_reader_lock`` held."""
        if self._snapshot_store is not None and self._snapshot_store[0] == snapshot:
            return self._snapshot_store[1]
        if not snapshot.exists():
            snapshot = latest_snapshot(self.db)
            if snapshot is None:
                return None
        if self._snapshot_store is not None:
            self._snapshot_store[1].close()
        self._snapshot_store = (snapshot, Store(snapshot, read_only=True))
        return self._snapshot_store[1]

    def encoder(self, view: CollectionView):
        """The encoder a view was embedded with, loaded once (torch and the weights)."""
        with self._encoder_lock:
            if view.collection_id not in self._encoders:
                from hctembed.search import encoder_of

                snapshot = self.catalogue.snapshot
                if snapshot is None:
                    raise InputError(f"model {view.model_id} is not in the snapshot yet; try again after the embed")
                with self._reader_lock:
                    store = self._reader(snapshot)
                    if store is None:
                        raise InputError(f"model {view.model_id} is not in a snapshot yet; try again shortly")
                    collection = store.collection(model_id=view.model_id, fingerprint=view.fingerprint)
                    model = collection.model()
                # torch and the weights load outside the snapshot's lock
                self._encoders[view.collection_id] = encoder_of(
                    model, model_id=view.model_id, fingerprint=view.fingerprint
                )
            return self._encoders[view.collection_id]

    def health(self) -> dict[str, Any]:
        with self.lock:
            cat = self.catalogue
            return {
                "status": "ok",
                "scans": len(cat.facts),
                "models": [
                    {
                        "model_id": v.model_id,
                        "fingerprint": v.fingerprint,
                        "vectors": v.live,
                        **v.answer(),
                        "index_from": v.source,
                        "removed_pending": len(v.removed),
                    }
                    for v in cat.views.values()
                ],
                "snapshot_time_ns": cat.since,
                "live_batches": len(self._seen),
            }


def _signature(db: Path) -> tuple:
    """The database's file and write-ahead log, as ``(size, mtime_ns)`` each: changes with every write."""
    wal = Path(str(db) + ".wal")
    stats = [db.stat(), wal.stat() if wal.exists() else None]
    return tuple((s.st_size, s.st_mtime_ns) if s is not None else None for s in stats)


def load_catalogue(snapshot: Path, *, paths: SidecarPaths | None = None, exact: bool = False) -> Catalogue:
    """Every collection's index (its saved one among the database's ``paths`` when current, else exact over its
    vectors) and every scan's facts from a snapshot file."""
    views, facts = {}, {}
    paths = paths or SidecarPaths(snapshot)
    with Store(snapshot, read_only=True) as store:
        for collection in store.collections():
            view = saved_view(collection, paths=paths, exact=exact)
            when = collection.last_embedded()
            view.last_embedded = when.timestamp() if when is not None else 0.0
            views[collection.collection_id] = view
        patients = {}
        for row in store.scans.all():
            patients[row.scan_id] = row.patient_id
            facts[row.scan_id] = {"format": row.format, "meta": row.meta}
        labels = store.labels.of()
    return Catalogue(views, patients, labels, facts, snapshot, snapshot_time(snapshot))


def apply_batch(cat: Catalogue, rows: list[dict]) -> None:
    """One live feed file: add vectors (new views for a model not in the snapshot), delete scans' vectors."""
    for row in rows:
        view = cat.views.get(row["collection_id"])
        if view is None:
            dim = len(row["vector"]) if row["vector"] is not None else 0
            if not dim:
                continue
            view = CollectionView.empty(
                collection_id=row["collection_id"], model_id=row["model_id"], fingerprint=row["fingerprint"], dim=dim
            )
            cat.views[row["collection_id"]] = view
        scan_id = row["scan_id"]
        if row["op"] == "delete":
            view.remove([scan_id])
            view.planes.pop(scan_id, None)
            continue
        view.add(np.asarray([row["id"]], np.int64), [scan_id], np.asarray([row["vector"]], np.float32))
        view.last_embedded = time.time()
        if row["planes"] is not None:
            view.planes[scan_id] = row["planes"]
        if row["patient_id"] or scan_id not in cat.patients:
            cat.patients[scan_id] = row["patient_id"]
        cat.labels[scan_id] = {k: float(v) for k, v in json.loads(row["labels"] or "{}").items()}
        cat.facts.setdefault(scan_id, {"format": None, "meta": {}})
