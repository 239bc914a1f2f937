"""Which FAISS index to build: exact, HNSW, IVF-Flat or IVF-PQ with exact re-ranking, each with measured recall.

Kinds map to FAISS factory strings (inner product, ids kept by ``IDMap2``):

* ``exact``: ``IDMap2,Flat`` (brute force).
* ``hnsw``: ``IDMap2,HNSW{M}``, ``M`` 32, or :data:`LARGE_HNSW_M` from :data:`LARGE_COLLECTION` vectors on (a
  denser graph reaches recall@10 0.99 at a lower ``efSearch``: BENCHMARKS.md, "10⁶ vectors: HNSW sweep");
  ``efSearch`` tuned at build time on a ladder fine enough to stop near the target.
* ``ivf``: ``IDMap2,IVF{nlist},Flat``, ``nlist`` ≈ 4·√N (at least 39 training vectors per list); ``nprobe`` tuned.
* ``ivfpq``: ``IDMap2,IVF{nlist},PQ{m}x{bits}np,RFlat``: product-quantised lists (``m`` = dim / 8 bytes per
  vector) whose shortlist of ``k · k_factor`` candidates is re-ranked exactly against the stored vectors
  (``IndexRefineFlat``); ``nprobe`` tuned, then ``k_factor`` (8 to 128) if probing every list is not enough.
* ``auto``: exact until an approximate index holds recall@10 ≥ 0.99 at a lower measured single-query
  latency; collections under ``AUTO_MIN_VECTORS`` are always exact, and from :data:`LARGE_COLLECTION` on only
  HNSW is tried (IVF's k-means and IVF-PQ's training over 10⁶ × 768 take far longer than the graph on a few
  cores, and HNSW already answers in milliseconds there).

Recall@10 is measured at build time on a seeded sample of the stored vectors held out of the index while it
is trained, filled and tuned (so they are unseen queries, like a new scan), against exact search of the
same contents; the sample is added afterwards. Querying with vectors already in a graph index would
overstate its recall (HNSW on 2,000 random 64-d vectors: 0.99 on stored vectors, 0.86 on unseen ones).
The search parameter is the first on a ladder that reaches the target recall (the last one when none does).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import faiss
import numpy as np

from hctembed.errors import InputError

log = logging.getLogger(__name__)

KINDS = ("exact", "hnsw", "ivf", "ivfpq", "auto")
APPROXIMATE = ("hnsw", "ivf", "ivfpq")
EXACT_FACTORY = "IDMap2,Flat"
AUTO_MIN_VECTORS = 20_000  # below this, brute force is a few ms at most: approximate search buys nothing
AUTO_MIN_RECALL = 0.99
RECALL_K = 10
EF_LADDER = (16, 32, 64, 128, 192, 256, 320, 384, 512, 768, 1024)
LARGE_COLLECTION = 300_000  # from here on: the denser HNSW graph, and auto tries HNSW alone
LARGE_HNSW_M = 48
K_FACTOR = 8  # ivfpq: exact re-ranking of the top k * K_FACTOR PQ candidates


@dataclass(frozen=True)
class IndexOptions:
    """How to build an index. ``kind`` is one of :data:`KINDS`; ``target_recall`` drives parameter tuning."""

    kind: str = "exact"
    target_recall: float = 0.95
    recall_queries: int = 200
    latency_queries: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"index kind {self.kind!r} is not one of {', '.join(KINDS)}")


@dataclass(frozen=True)
class BuiltIndex:
    """A built (CPU) index and what was measured while building it."""

    index: faiss.Index
    kind: str
    factory: str
    params: dict = field(default_factory=dict)  # efSearch / nprobe / k_factor
    recall_at_10: float | None = None  # vs exact on the sample; 1.0 for exact
    p50_ms: float | None = None  # single-query latency on the sample
    exact_p50_ms: float | None = None
    build_seconds: float = 0.0
    note: str = ""
    recall_queries: int = 0  # held-out stored vectors the recall was measured on


def nlist_for(n: int) -> int:
    """Inverted lists: ≈ 4·√N, but at least 39 training vectors per list (FAISS's k-means minimum)."""
    return max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39))


def pq_for(n: int, dim: int) -> tuple[int, int]:
    """``(m, bits)``: m sub-quantisers (8 dims each, m divides dim), 2**bits centroids trainable from n vectors."""
    m = max((d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, dim // 8)), default=1)
    bits = int(min(8, max(4, math.floor(math.log2(max(n, 1) / 39)))))
    return m, bits


def hnsw_m_for(n: int) -> int:
    """Graph degree of an HNSW index over ``n`` vectors."""
    return LARGE_HNSW_M if n >= LARGE_COLLECTION else 32


def factory_for(kind: str, *, n: int, dim: int) -> str:
    if kind == "exact":
        return EXACT_FACTORY
    if kind == "hnsw":
        return f"IDMap2,HNSW{hnsw_m_for(n)}"
    if kind == "ivf":
        return f"IDMap2,IVF{nlist_for(n)},Flat"
    if kind == "ivfpq":
        m, bits = pq_for(n, dim)
        return f"IDMap2,IVF{nlist_for(n)},PQ{m}x{bits}np,RFlat"
    raise InputError(f"no factory for index kind {kind!r}")


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply ``efSearch`` / ``nprobe`` / ``k_factor`` to the index (through IDMap2 and the refine wrapper)."""
    node = faiss.downcast_index(index)
    while node is not None:
        if isinstance(node, faiss.IndexIDMap2 | faiss.IndexIDMap):
            node = faiss.downcast_index(node.index)
            continue
        if isinstance(node, faiss.IndexRefine):
            if "k_factor" in params:
                node.k_factor = float(params["k_factor"])
            node = faiss.downcast_index(node.base_index)
            continue
        if isinstance(node, faiss.IndexHNSW) and "efSearch" in params:
            node.hnsw.efSearch = int(params["efSearch"])
        if isinstance(node, faiss.IndexIVF) and "nprobe" in params:
            node.nprobe = int(params["nprobe"])
        break


def exact_top_k(xb: np.ndarray, xq: np.ndarray, *, k: int) -> np.ndarray:
    """Row positions in ``xb [N, d]`` of the top-``k`` inner products of each query ``xq [Q, d]``: ``[Q, k]``."""
    k = min(k, xb.shape[0])
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)[1]


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (ids ``[Q, k]``; -1 never matches)."""
    hits = [len(set(f[f >= 0].tolist()) & set(t.tolist())) / max(len(t), 1) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")


def p50_latency_ms(index: faiss.Index, xq: np.ndarray, *, k: int = RECALL_K) -> float:
    """Median wall time of one-query searches, in ms."""
    times = []
    for q in xq:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3) if times else float("nan")


def build(ids: np.ndarray, xb: np.ndarray, *, options: IndexOptions) -> BuiltIndex:
    """Build the index ``options`` asks for over ``xb [N, dim]`` (ids ``[N]``), tune and measure it."""
    n = xb.shape[0]
    kind = options.kind
    if kind == "exact" or n == 0 or (kind in APPROXIMATE and n < 4 * RECALL_K):
        return _build_exact(ids, xb, note="" if kind == "exact" else f"{n} vectors: exact")
    held_out = np.zeros(n, bool)
    held_out[np.random.default_rng(options.seed).choice(n, size=min(n // 2, options.recall_queries), replace=False)] = (
        True
    )
    split = _Split(ids=ids, xb=xb, held_out=held_out)
    if kind != "auto":
        return _build_approximate(kind, split, target=options.target_recall, options=options)
    exact = _build_exact(ids, xb, note="")
    exact_ms = p50_latency_ms(exact.index, split.xq[: options.latency_queries])
    if n < AUTO_MIN_VECTORS:
        return _with(exact, kind="exact", exact_p50_ms=exact_ms, p50_ms=exact_ms, note=f"auto: {n} vectors, exact")
    best = None
    for candidate in ("hnsw",) if n >= LARGE_COLLECTION else APPROXIMATE:
        built = _build_approximate(candidate, split, target=AUTO_MIN_RECALL, options=options)
        log.info(
            "auto: %s recall@10 %.3f, p50 %.3f ms (exact %.3f ms)",
            candidate,
            built.recall_at_10,
            built.p50_ms,
            exact_ms,
        )
        if (
            built.recall_at_10 >= AUTO_MIN_RECALL
            and built.p50_ms < exact_ms
            and (best is None or built.p50_ms < best.p50_ms)
        ):
            best = built
    if best is None:
        return _with(
            exact,
            exact_p50_ms=exact_ms,
            p50_ms=exact_ms,
            note=f"auto: no approximate index reached recall@10 >= {AUTO_MIN_RECALL} faster than exact",
        )
    return _with(best, exact_p50_ms=exact_ms, note=f"auto: {best.kind} beats exact at recall@10 >= {AUTO_MIN_RECALL}")


@dataclass(frozen=True)
class _Split:
    """The stored vectors with a held-out sample: the index is trained and tuned without it, then it is added."""

    ids: np.ndarray
    xb: np.ndarray
    held_out: np.ndarray  # [N] bool

    @property
    def xq(self) -> np.ndarray:
        return self.xb[self.held_out]

    def truth(self) -> np.ndarray:
        """Exact top-10 ids among the other vectors for each held-out one: ``[Q, 10]``."""
        rest = ~self.held_out
        return self.ids[rest][exact_top_k(self.xb[rest], self.xq, k=RECALL_K)]


def _with(built: BuiltIndex, **changes) -> BuiltIndex:
    return replace(built, **changes)


def _build_exact(ids: np.ndarray, xb: np.ndarray, *, note: str) -> BuiltIndex:
    start = time.perf_counter()
    index = faiss.index_factory(xb.shape[1], EXACT_FACTORY, faiss.METRIC_INNER_PRODUCT)
    if len(ids):
        index.add_with_ids(xb, ids)
    return BuiltIndex(
        index, "exact", EXACT_FACTORY, recall_at_10=1.0, build_seconds=time.perf_counter() - start, note=note
    )


def _build_approximate(kind: str, split: _Split, *, target: float, options: IndexOptions) -> BuiltIndex:
    """Train on and add all but the held-out sample; tune on the sample as unseen queries; then add it."""
    n, dim = split.xb.shape
    factory = factory_for(kind, n=n, dim=dim)
    start = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    rest = ~split.held_out
    if not index.is_trained:
        index.train(split.xb[rest])
    index.add_with_ids(split.xb[rest], split.ids[rest])
    built_s = time.perf_counter() - start
    if kind == "hnsw":
        ladder = [{"efSearch": ef} for ef in EF_LADDER]
    else:
        nlist = faiss.extract_index_ivf(index).nlist
        probes = sorted({min(2**i, nlist) for i in range(int(math.log2(nlist)) + 2)})
        ladder = [{"nprobe": p} | ({"k_factor": K_FACTOR} if kind == "ivfpq" else {}) for p in probes]
        if kind == "ivfpq":  # all lists probed and still short: re-rank a longer PQ shortlist
            ladder += [{"nprobe": probes[-1], "k_factor": K_FACTOR * 2**i} for i in range(1, 5)]
    truth, xq = split.truth(), split.xq
    for params in ladder:
        set_search_params(index, params)
        recall = recall_at(index.search(xq, RECALL_K)[1], truth)
        if recall >= target:
            break
    p50 = p50_latency_ms(index, xq[: options.latency_queries])
    index.add_with_ids(xq, split.ids[split.held_out])
    return BuiltIndex(
        index,
        kind,
        factory,
        params=params,
        recall_at_10=recall,
        p50_ms=p50,
        build_seconds=time.perf_counter() - start,
        note=f"trained and filled in {built_s:.2f} s; recall on {len(xq)} held-out stored vectors",
        recall_queries=len(xq),
    )
