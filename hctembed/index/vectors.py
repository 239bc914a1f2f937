"""FAISS inner-product index: a derived, rebuildable cache of one collection's vectors.

Files, beside the DuckDB file (:class:`hctembed.index.store.SidecarPaths`):
``<db>.faiss/c<collection_id>.faiss`` and its manifest ``.json`` (dim, metric, model_id, fingerprint, ntotal,
sha256 of the index file, digest of the id set, and the index kind with its search parameters and the
recall@10 and latency measured when it was built; see :mod:`hctembed.index.choice`). Writes are atomic
(temporary file, fsync, rename). :func:`open_index` checks the manifest against DuckDB and rebuilds - with the
same kind - when the index is missing, stale (other ids) or corrupt (checksum or read failure), or when
another kind is asked for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

from hctembed.index.choice import EXACT_FACTORY, KINDS, BuiltIndex, IndexOptions, build, set_search_params
from hctembed.index.store import Collection, ModelMismatchError

log = logging.getLogger(__name__)

METRIC = "inner_product"
GPU_KINDS = ("exact", "ivf")  # kinds FAISS can move to a GPU as they are


@dataclass(frozen=True)
class IndexManifest:
    dim: int
    metric: str
    model_id: str
    fingerprint: str
    ntotal: int
    factory: str
    checksum: str  # sha256 of the index file
    ids_digest: str  # sha256 of the sorted int64 ids
    store_id: str = ""  # the database file it was built from (Store.store_id)
    rows_digest: str = ""  # Collection.rows_digest() of the rows it was built from (ids, scan ids, insert times)
    # added for index choice; defaults let older manifests (exact indices) load unchanged
    kind: str = "exact"  # exact | hnsw | ivf | ivfpq: what was built
    requested: str = "exact"  # what was asked for (auto resolves to a kind); a rebuild asks for it again
    search_params: dict = field(default_factory=dict)  # efSearch / nprobe / k_factor
    recall_at_10: float | None = None  # vs exact, measured at build on recall_queries held-out stored vectors
    recall_queries: int = 0
    p50_ms: float | None = None  # single-query latency at build time (this index / exact)
    exact_p50_ms: float | None = None
    build_seconds: float | None = None
    note: str = ""


@dataclass(frozen=True)
class SearchResult:
    """FAISS's output: scores ``D [Q, k]`` (inner product, higher is closer) and ids ``I [Q, k]`` (-1 = none)."""

    D: np.ndarray
    I: np.ndarray  # noqa: E741 - FAISS's name


class VectorIndex:
    """A FAISS index bound to one (model_id, fingerprint)."""

    def __init__(
        self, index: faiss.Index, *, model_id: str, fingerprint: str, factory: str, kind: str = "exact"
    ) -> None:
        self.index = index
        self.model_id = model_id
        self.fingerprint = fingerprint
        self.factory = factory
        self.kind = kind

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, xq: np.ndarray, *, k: int, model_id: str, fingerprint: str) -> SearchResult:
        """Top-``k`` by inner product for queries ``xq [Q, dim]`` embedded by ``model_id``/``fingerprint``."""
        if (model_id, fingerprint) != (self.model_id, self.fingerprint):
            raise ModelMismatchError(
                f"query embedded with model {model_id} / preprocessing {fingerprint}, but the index holds "
                f"model {self.model_id} / preprocessing {self.fingerprint}"
            )
        xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
        if xq.shape[1] != self.dim:
            raise ModelMismatchError(f"query dim {xq.shape[1]} != index dim {self.dim} ({self.model_id})")
        k = max(1, min(int(k), max(self.ntotal, 1)))
        D, I = self.index.search(xq, k)  # noqa: E741
        return SearchResult(D=D, I=I)


def build_index(
    ids: np.ndarray, xb: np.ndarray, *, model_id: str, fingerprint: str, factory: str = EXACT_FACTORY
) -> VectorIndex:
    """Build an (untuned) inner-product index over ``xb [N, dim]`` with int64 ``ids [N]``; exact by default."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    index = faiss.index_factory(xb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if len(ids) and not index.is_trained:
        index.train(xb)
    if len(ids):
        index.add_with_ids(xb, ids)
    return VectorIndex(index, model_id=model_id, fingerprint=fingerprint, factory=factory)


def ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(ids, dtype=np.int64)).astype("<i8").tobytes()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_index(
    vi: VectorIndex,
    *,
    index_path: Path,
    manifest_path: Path,
    ids: np.ndarray,
    store_id: str = "",
    rows_digest: str = "",
    built: BuiltIndex | None = None,
    requested: str = "exact",
) -> IndexManifest:
    """Write the index, then its manifest, each atomically. A crash between leaves a detectable mismatch.

    ``built`` (from :func:`hctembed.index.choice.build`) adds the kind, search parameters and measurements.
    """
    data = faiss.serialize_index(vi.index).tobytes()
    _atomic_write(index_path, data)
    manifest = IndexManifest(
        dim=vi.dim,
        metric=METRIC,
        model_id=vi.model_id,
        fingerprint=vi.fingerprint,
        ntotal=vi.ntotal,
        factory=vi.factory,
        checksum=hashlib.sha256(data).hexdigest(),
        ids_digest=ids_digest(ids),
        store_id=store_id,
        rows_digest=rows_digest,
        kind=vi.kind,
        requested=requested,
    )
    if built is not None:
        manifest = IndexManifest(
            **(
                asdict(manifest)
                | {
                    "search_params": dict(built.params),
                    "recall_at_10": built.recall_at_10,
                    "recall_queries": built.recall_queries,
                    "p50_ms": built.p50_ms,
                    "exact_p50_ms": built.exact_p50_ms,
                    "build_seconds": round(built.build_seconds, 3),
                    "note": built.note,
                }
            )
        )
    _atomic_write(manifest_path, json.dumps(asdict(manifest), indent=2).encode())
    return manifest


def load_index(*, index_path: Path, manifest_path: Path) -> tuple[VectorIndex, IndexManifest]:
    """Load and verify an index against its manifest; raises ``IndexInvalid`` naming the problem."""
    if not index_path.exists() or not manifest_path.exists():
        raise IndexInvalid("missing")
    try:
        manifest = IndexManifest(**json.loads(manifest_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise IndexInvalid(f"unreadable manifest ({exc})") from None
    if _sha256_file(index_path) != manifest.checksum:
        raise IndexInvalid("checksum mismatch (truncated or modified file)")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as exc:
        raise IndexInvalid(f"FAISS cannot read it ({str(exc).splitlines()[0]})") from None
    if index.ntotal != manifest.ntotal or index.d != manifest.dim:
        raise IndexInvalid("index does not match its manifest")
    set_search_params(index, manifest.search_params)
    vi = VectorIndex(
        index,
        model_id=manifest.model_id,
        fingerprint=manifest.fingerprint,
        factory=manifest.factory,
        kind=manifest.kind,
    )
    return vi, manifest


class IndexInvalid(RuntimeError):
    pass


def open_index(
    collection: Collection,
    *,
    rebuild: bool = False,
    quiet: bool = False,
    options: IndexOptions | None = None,
) -> VectorIndex:
    """The collection's FAISS index, verified against DuckDB; rebuilt (and saved) when it is not valid.

    ``options`` picks the index kind (:class:`hctembed.index.choice.IndexOptions`); without it, the kind
    the saved index was asked for is kept (``auto`` for a new index: exact below 20,000 vectors). An index of
    another requested kind is rebuilt. A rebuild is logged as a warning, naming why, unless ``quiet`` (after an
    embedding run, a stale index is expected). On a machine with a GPU, exact and IVF-Flat indices are searched there.
    """
    index_path, manifest_path = collection.index_files()
    store_id = collection.store.store_id
    n_rows, rows = collection.rows_digest()
    reason = "rebuild requested" if rebuild else None
    if options is None:
        options = IndexOptions(kind=_requested_kind(manifest_path))
    if reason is None:
        try:
            vi, manifest = load_index(index_path=index_path, manifest_path=manifest_path)
            reason = stale_reason(manifest, collection=collection, store_id=store_id, rows=(n_rows, rows))
            if reason is None and manifest.requested != options.kind:
                reason = f"index kind {options.kind} requested, the saved one is {manifest.requested}"
            if reason is None:
                return _on_gpu(vi)
        except IndexInvalid as exc:
            reason = str(exc)
    if reason != "missing" and not quiet:
        log.warning("rebuilding FAISS index %s from the database: %s", index_path, reason)
    ids, xb, _ = collection.vectors()
    built = build(ids, np.ascontiguousarray(xb, dtype=np.float32), options=options)
    if built.kind != "exact" or options.kind != "exact":
        log.info(
            "index %s (%s): recall@10 %s, p50 %s ms, built in %.1f s",
            built.kind,
            built.factory,
            built.recall_at_10,
            built.p50_ms,
            built.build_seconds,
        )
    vi = VectorIndex(
        built.index,
        model_id=collection.model_id,
        fingerprint=collection.fingerprint,
        factory=built.factory,
        kind=built.kind,
    )
    try:
        save_index(
            vi,
            index_path=index_path,
            manifest_path=manifest_path,
            ids=ids,
            store_id=store_id,
            rows_digest=rows,
            built=built,
            requested=options.kind,
        )
    except OSError as exc:
        log.warning("could not save the rebuilt index (%s); using it from memory", exc)
    return _on_gpu(vi)


def stale_reason(
    manifest: IndexManifest, *, collection: Collection, store_id: str, rows: tuple[int, str]
) -> str | None:
    """Why a saved index does not answer for ``collection`` as it stands (``rows``: its
    :meth:`Collection.rows_digest`), or None when it holds exactly its rows."""
    n_rows, digest = rows
    if (manifest.model_id, manifest.fingerprint, manifest.dim) != (
        collection.model_id,
        collection.fingerprint,
        collection.dim,
    ):
        return (
            f"it holds model {manifest.model_id} / {manifest.fingerprint}, "
            f"not {collection.model_id} / {collection.fingerprint}"
        )
    if manifest.store_id != store_id:
        return "it was built from another database file"
    if manifest.ntotal != n_rows:
        return f"stale ({manifest.ntotal} vectors indexed, {n_rows} in the database)"
    if not manifest.rows_digest:
        return "its manifest predates the check of the rows it indexes (rebuilt once)"
    if manifest.rows_digest != digest:
        return "it indexes other rows than the database holds (an older index, or a copy that diverged)"
    return None


def index_name(factory: str) -> str:
    """How answers name an index: ``flat``, ``hnsw48``, ``ivf1024``, ``ivfpq``, from its FAISS factory string."""
    parts = [p for p in factory.split(",") if p != "IDMap2"]
    head = parts[0].lower() if parts else "flat"
    if head.startswith("ivf") and any(p.startswith("PQ") for p in parts):
        return "ivfpq"
    return head


def _requested_kind(manifest_path: Path) -> str:
    """The kind the saved index was asked for; ``auto`` for a new index (exact until the collection is large enough
    for an approximate one to hold recall@10 >= 0.99 faster), exact when the manifest cannot be read."""
    if not manifest_path.exists():
        return "auto"
    try:
        kind = json.loads(manifest_path.read_text()).get("requested", "exact")
    except (OSError, ValueError, AttributeError):
        return "exact"
    return kind if isinstance(kind, str) and kind in KINDS else "exact"


def _on_gpu(vi: VectorIndex) -> VectorIndex:
    """Move exact / IVF-Flat indices to the GPUs when FAISS sees any; otherwise (or if it fails) keep the CPU one."""
    if vi.kind not in GPU_KINDS or faiss.get_num_gpus() == 0 or vi.ntotal == 0:
        return vi
    try:
        index = faiss.index_cpu_to_all_gpus(vi.index)
    except (RuntimeError, AttributeError) as exc:
        log.warning("keeping the FAISS index on the CPU: %s", str(exc).splitlines()[0] if str(exc) else exc)
        return vi
    return VectorIndex(index, model_id=vi.model_id, fingerprint=vi.fingerprint, factory=vi.factory, kind=vi.kind)
