"""Merge speed: storing a sharded run's Parquet parts in DuckDB, against storing the same outcomes from memory.

    python benchmarks/merge_speed.py [--n 100000] [--world 8] [--dim 768]

Writes ``--n`` synthetic outcomes (random unit vectors, realistic metadata) as the parts of ``--world``
ranks (256 outcomes per part, as ``embed --distributed`` writes them), then times, into fresh DuckDB files:

* ``memory``: the same outcomes, already in position order in memory, through ``store_outcomes`` in chunks
  of 2,048 (what a single process's batches amount to, minus the encoding), then the exact FAISS index —
  the baseline;
* ``merge``:  ``merge_shards`` reading and sorting the parts, then the same index, in a child process whose
  peak memory is reported (it should not grow with ``--n``: the parts are streamed, not loaded).

Prints seconds, outcomes/s, the ratio and the merge's peak memory; writes
``benchmarks/results/merge_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from hctembed.embedding.parts import MERGE_CHUNK, PartWriter
from hctembed.embedding.run import Outcome, refresh_index, store_outcomes
from hctembed.embedding.shards import RUN_FILE, merge_shards
from hctembed.index.store import ModelRow, Store


def outcomes_of(n: int, *, dim: int, seed: int = 0) -> tuple[list[Outcome], np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    outcomes = [
        Outcome(
            position=i,
            source=f"p{i // 3:06d}/s{i:07d}.nii.gz",
            scan_id=f"s{i:07d}",
            status="embedded",
            reason=None,
            file_size=40_000_000 + i,
            file_mtime_ns=1_700_000_000_000_000_000 + i,
            patient_id=f"p{i // 3:06d}",
            format="nifti",
            meta={"format": "nifti", "shape_xyz": [512, 512, 170], "spacing_xyz": [0.45, 0.45, 1.0], "flags": []},
        )
        for i in range(n)
    ]
    return outcomes, vectors


def _merge(folder: Path, db: Path, result) -> None:
    with Store(db) as store:
        start = time.perf_counter()
        report = merge_shards(folder=folder, store=store, keep_parts=True)
        result.put((time.perf_counter() - start, report.embedded))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args()
    outcomes, vectors = outcomes_of(args.n, dim=args.dim)
    info = {
        "run_key": "bench",
        "model_id": "bench-model",
        "name": "vit-base",
        "dim": args.dim,
        "config": {},
        "weights_path": None,
        "weights_digest": None,
        "card": None,
        "fingerprint": "pp-bench",
        "preprocess": {},
        "world": args.world,
        "scans": args.n,
        "skipped": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with Store(tmp / "memory.duckdb") as store:
            store.models.register(ModelRow(model_id="bench-model", name="vit-base", dim=args.dim))
            coll = store.collection(model_id="bench-model", fingerprint="pp-bench", dim=args.dim, preprocess={})
            start = time.perf_counter()
            for i in range(0, args.n, MERGE_CHUNK):
                with store.transaction():
                    store_outcomes(coll, outcomes[i : i + MERGE_CHUNK], vectors[i : i + MERGE_CHUNK])
            store.checkpoint()
            refresh_index(coll)
            memory_s = time.perf_counter() - start
        folder = tmp / "shards"
        folder.mkdir()
        (folder / RUN_FILE).write_text(json.dumps(info))
        start = time.perf_counter()
        for rank in range(args.world):
            writer = PartWriter(folder, rank=rank, dim=args.dim, rows_per_part=256)
            for i in range(rank, args.n, args.world):
                writer.add([outcomes[i]], vectors[i : i + 1])
            writer.flush()
        write_s = time.perf_counter() - start
        parts_mb = sum(p.stat().st_size for p in (folder / "parts").glob("*.parquet")) / 1e6
        del outcomes, vectors
        context = multiprocessing.get_context("spawn")
        result = context.Queue()
        child = context.Process(target=_merge, args=(folder, tmp / "merged.duckdb", result))
        child.start()
        merge_s, embedded = result.get()
        child.join()
        assert embedded == args.n, embedded
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    row = {
        "n": args.n,
        "world": args.world,
        "dim": args.dim,
        "parts_mb": round(parts_mb, 1),
        "write_parts_s": round(write_s, 2),
        "memory_s": round(memory_s, 2),
        "merge_s": round(merge_s, 2),
        "merge_per_s": round(args.n / merge_s),
        "merge_over_memory": round(merge_s / memory_s, 2),
        "merge_peak_rss_mb": round(peak_mb),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(row))
    out = Path(__file__).parent / "results" / "merge_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
