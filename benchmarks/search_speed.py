"""Search speed: exact vs HNSW, IVF-Flat and IVF-PQ (+ exact re-ranking), and all-vs-all evaluation time.

For each size N (10^4 and 10^5 vectors of dim 768; 10^6 with ``--full``, 3 GB of float32), random unit
vectors are indexed with hctembed's own builder (:func:`hctembed.index.choice.build`: FAISS factory string,
training on the stored vectors, search parameter tuned to recall@10 >= ``--target`` on a sample of stored
vectors). Then, on held-out random queries (not stored vectors, so harder than the build-time sample):

* ``p50`` / ``p99`` latency of one-query searches (k = 10), in ms;
* ``recall@10`` against exact search (numpy-free: FAISS ``IndexFlatIP`` on the same vectors);
* build time (training + adding + tuning), in s; the build-time recall the manifest would record.

Ratios are against exact, measured in the same run. Random unit vectors in 768 dims are the hardest case
for approximate search (no cluster structure: all neighbours are nearly equidistant), so recall and speed
on real embeddings should be better; ``--data lowrank`` draws vectors near a random 32-dimensional
subspace (plus 10% isotropic noise) as a stand-in for such structure. Also times
``hctembed.eval.retrieval.all_vs_all`` on 10,400 random 768-d vectors with 4 labels (25% positives each;
the paper's RSNA run has 10,379 scans and 4 subtypes), against the score matrices alone.

    python benchmarks/search_speed.py [--sizes 10000 100000] [--full] [--queries 1000] [--quick] [--eval-only]
    python benchmarks/search_speed.py --data lowrank --out benchmarks/results/search_speed_lowrank.json
    python benchmarks/search_speed.py --data lowrank --sizes 1000000 --hnsw-sweep 32 48 --efs 128 192 256 384 512

``--hnsw-sweep M ...`` builds one HNSW graph per ``M`` (efConstruction ``--ef-construction``) on the same vectors
and, for each ``efSearch`` of ``--efs``, measures p50 / p99 and recall@10 on the held-out queries, with the build
time and the process's peak memory: the table behind ``hctembed.index.choice``'s HNSW settings for large
collections.

Writes JSON to ``benchmarks/results/search_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from hctembed.eval.retrieval import all_vs_all
from hctembed.index.choice import IndexOptions, build, recall_at

KINDS = ("exact", "hnsw", "ivf", "ivfpq")


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """``[n, dim]`` float32 unit vectors, generated in chunks to bound temporary memory."""
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        chunk = rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32)
        out[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def lowrank_unit_vectors(
    rng: np.random.Generator, n: int, dim: int, *, rank: int = 32, noise: float = 0.1
) -> np.ndarray:
    """``[n, dim]`` unit vectors near a random ``rank``-dimensional subspace (structure like real embeddings).

    The subspace (its basis drawn from a fixed seed) is shared by every call with the same ``dim``/``rank``,
    so base and query vectors come from the same distribution.
    """
    basis = np.random.default_rng(12345).standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        chunk = rng.standard_normal((m, rank), dtype=np.float32) @ basis
        chunk += noise * rng.standard_normal((m, dim), dtype=np.float32) / np.sqrt(dim)
        out[start : start + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def latencies_ms(index: faiss.Index, xq: np.ndarray, *, k: int = 10) -> np.ndarray:
    times = np.empty(len(xq))
    for i, q in enumerate(xq):
        start = time.perf_counter()
        index.search(q[None], k)
        times[i] = time.perf_counter() - start
    return times * 1e3


def bench_size(
    n: int, *, dim: int, n_queries: int, target: float, seed: int, data: str = "random", kinds=KINDS
) -> list[dict]:
    rng = np.random.default_rng(seed)
    make = lowrank_unit_vectors if data == "lowrank" else unit_vectors
    xb = make(rng, n, dim)
    xq = make(rng, n_queries, dim)
    ids = np.arange(n, dtype=np.int64)
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    truth = flat.search(xq, 10)[1]
    del flat
    rows = []
    for kind in ("exact", *[k for k in kinds if k != "exact"]):  # exact first: the ratios' baseline
        built = build(ids, xb, options=IndexOptions(kind=kind, target_recall=target, seed=seed))
        lat = latencies_ms(built.index, xq)
        found = built.index.search(xq, 10)[1]
        rows.append(
            {
                "n": n,
                "dim": dim,
                "data": data,
                "kind": kind,
                "factory": built.factory,
                "params": built.params,
                "build_s": round(built.build_seconds, 2),
                "p50_ms": round(float(np.percentile(lat, 50)), 3),
                "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "recall_at_10": round(recall_at(found, truth), 4),
                "build_recall_at_10": round(float(built.recall_at_10), 4),
            }
        )
        print(_fmt(rows[-1]), flush=True)
        del built
    exact = rows[0]
    for row in rows:
        row["p50_speedup_vs_exact"] = round(exact["p50_ms"] / row["p50_ms"], 2)
    return rows


def _fmt(row: dict) -> str:
    return (
        f"N={row['n']:>8} {row['kind']:>6} {row['factory']:<32} {json.dumps(row['params']):<32} "
        f"build {row['build_s']:8.2f} s  p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms  "
        f"recall@10 {row['recall_at_10']:.3f} (build {row['build_recall_at_10']:.3f})"
    )


def hnsw_sweep(
    n: int, *, dim: int, n_queries: int, seed: int, data: str, ms: list[int], efs: list[int], ef_construction: int
) -> list[dict]:
    """Per (M, efSearch): build seconds, p50 / p99 ms and recall@10 of ``IndexHNSWFlat`` against exact."""
    import resource

    rng = np.random.default_rng(seed)
    make = lowrank_unit_vectors if data == "lowrank" else unit_vectors
    xb = make(rng, n, dim)
    xq = make(rng, n_queries, dim)
    flat = faiss.IndexFlatIP(dim)
    flat.add(xb)
    exact_lat = latencies_ms(flat, xq[:100])
    truth = flat.search(xq, 10)[1]
    del flat
    rows = []
    for m in ms:
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        start = time.perf_counter()
        index.add(xb)
        build_s = time.perf_counter() - start
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for ef in efs:
            index.hnsw.efSearch = ef
            lat = latencies_ms(index, xq)
            found = index.search(xq, 10)[1]
            rows.append({
                "n": n, "dim": dim, "data": data, "M": m, "efConstruction": ef_construction, "efSearch": ef,
                "build_s": round(build_s, 1), "peak_rss_gb": round(peak_gb, 2),
                "p50_ms": round(float(np.percentile(lat, 50)), 3), "p99_ms": round(float(np.percentile(lat, 99)), 3),
                "recall_at_10": round(recall_at(found, truth), 4),
                "exact_p50_ms": round(float(np.percentile(exact_lat, 50)), 2),
            })  # fmt: skip
            r = rows[-1]
            print(
                f"N={n} HNSW{m} efC {ef_construction} efSearch {ef:5d}: build {build_s:7.1f} s  "
                f"p50 {r['p50_ms']:7.3f} ms  "
                f"p99 {r['p99_ms']:7.3f} ms  recall@10 {r['recall_at_10']:.4f}  (exact p50 {r['exact_p50_ms']} ms; "
                f"peak {peak_gb:.1f} GB)",
                flush=True,
            )
        del index
    return rows


def bench_all_vs_all(*, n: int, dim: int, repeats: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    labels = (rng.random((n, 4)) < 0.25).astype(np.float64)
    patients = [f"p{i // 3}" for i in range(n)]
    times, floor = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        all_vs_all(x, labels, label_names=["IPH", "IVH", "SAH", "SDH"], patient_ids=patients, exclude_same_patient=True)
        times.append(time.perf_counter() - start)
        # baseline: the score matrices alone (each label's positives against everything)
        start = time.perf_counter()
        for j in range(labels.shape[1]):
            x[labels[:, j] > 0.5] @ x.T
        floor.append(time.perf_counter() - start)
    seconds, scores_s = float(np.median(times)), float(np.median(floor))
    return {
        "n": n,
        "dim": dim,
        "labels": 4,
        "positives": 0.25,
        "exclude_same_patient": True,
        "seconds": round(seconds, 2),
        "score_matrices_s": round(scores_s, 2),
        "ratio_to_score_matrices": round(seconds / scores_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--full", action="store_true", help="also 10^6 vectors (3 GB; tens of minutes on 2 cores)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.95, help="recall@10 the build tunes for")
    parser.add_argument("--eval-n", type=int, default=10_400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2,000 vectors, dim 64")
    parser.add_argument(
        "--data",
        choices=["random", "lowrank"],
        default="random",
        help="random unit vectors (hardest case) or unit vectors near a random 32-d subspace, plus noise",
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="re-time only all-vs-all; the search rows of --out are kept"
    )
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="index kinds (exact always)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_speed.json")
    parser.add_argument("--hnsw-sweep", type=int, nargs="+", metavar="M", help="sweep HNSW M x efSearch instead")
    parser.add_argument("--efs", type=int, nargs="+", default=[128, 192, 256, 384, 512])
    parser.add_argument("--ef-construction", type=int, default=40)
    args = parser.parse_args()
    if args.hnsw_sweep:
        rows = [
            row
            for n in args.sizes
            for row in hnsw_sweep(
                n, dim=args.dim, n_queries=args.queries, seed=0, data=args.data, ms=args.hnsw_sweep, efs=args.efs,
                ef_construction=args.ef_construction,
            )
        ]  # fmt: skip
        out = args.out.with_name(args.out.stem + "_hnsw_sweep.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        facts = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
                 "load_average_at_end": os.getloadavg()[0]}  # fmt: skip
        out.write_text(json.dumps({"facts": facts, "sweep": rows}, indent=2))
        print(f"wrote {out}")
        return
    load_at_start = os.getloadavg()[0]
    sizes, dim, queries, eval_n = args.sizes + ([1_000_000] if args.full else []), args.dim, args.queries, args.eval_n
    if args.quick:
        sizes, dim, queries, eval_n, args.repeats = [2000], 64, 100, 1000, 1
    if args.eval_only and args.out.exists():  # keep the search rows of the last full run
        rows = json.loads(args.out.read_text())["search"]
    else:
        rows = [
            row
            for n in sizes
            for row in bench_size(
                n, dim=dim, n_queries=queries, target=args.target, seed=0, data=args.data, kinds=args.kinds
            )
        ]
    evaluation = bench_all_vs_all(n=eval_n, dim=dim, repeats=args.repeats, seed=1)
    print(
        f"all-vs-all retrieval, {eval_n} x {dim}, 4 labels: {evaluation['seconds']} s (median of {args.repeats}); "
        f"the score matrices alone {evaluation['score_matrices_s']} s ({evaluation['ratio_to_score_matrices']}x)"
    )
    print("\nratios against exact (same run): p50 speed-up, recall@10")
    for row in rows:
        print(f"  N={row['n']:>8} {row['kind']:>6}: {row['p50_speedup_vs_exact']:6.2f}x  {row['recall_at_10']:.3f}")
    facts = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(),
        "gpus": faiss.get_num_gpus(),
        "numpy": np.__version__,
        "load_average_at_start": load_at_start,
        "quick": args.quick,
        "eval_only": args.eval_only,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"facts": facts, "search": rows, "all_vs_all": evaluation}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
