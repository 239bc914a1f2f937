"""One prepared command for a GPU host: encoder and FAISS benchmarks in under 8 minutes, JSON out.

    python benchmarks/gpu_bench.py            # on a CUDA machine (pip install -e '.[gpu]' for GPU FAISS)
    python benchmarks/gpu_bench.py --quick    # smoke run anywhere: CUDA parts are skipped with a message

Sections, each skipped (with its reason) when its hardware is missing or the time budget is spent:

1. encoders on CUDA, fp32 and bf16 autocast: vit-base (96³) volumes/s against the GPU's own fp32 / bf16
   matmul rate, Merlin and CT-FM (random weights) per scan, batch 1 (``benchmarks/encoder_speed.py``);
2. FAISS on the GPU (needs ``faiss.get_num_gpus() > 0``): exact (``GpuIndexFlatIP``) and IVF-Flat with
   ``nprobe`` tuned to recall@10 >= 0.95, at 10^5 and 10^6 random unit vectors of dim 768: single-query
   p50 / p99, 1,000-query batch time, recall@10 against exact, build time;
3. FAISS on the host's CPUs at 10^4 and 10^5 (``benchmarks/search_speed.py``'s measurement), as the baseline;
4. end-to-end ``embed_archive`` with vit-base on CUDA against its serial stages, with 1 to 14 DataLoader
   workers on 32 synthetic 256x256 scans (``benchmarks/embed_speed.py``), preprocessing in the workers and
   then on the GPU (``--preprocess-device cuda``: the workers only decode): scans per second and CPU-seconds
   per scan, i.e. how throughput grows with preprocessing cores when the model is not the bottleneck.

Writes ``benchmarks/results/gpu_bench.json`` (``--out``); the encoder sections also write their own JSON
beside it. ``--budget`` (default 450 s) stops starting new sections once spent.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import embed_speed
import encoder_speed
import search_speed

from hctembed.index.choice import nlist_for, recall_at


def gpu_faiss(*, sizes: list[int], dim: int, n_queries: int, target: float) -> list[dict]:
    res = faiss.StandardGpuResources()
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        xb = search_speed.unit_vectors(rng, n, dim)
        xq = search_speed.unit_vectors(rng, n_queries, dim)
        start = time.perf_counter()
        flat = faiss.GpuIndexFlatIP(res, dim)
        flat.add(xb)
        flat_build = time.perf_counter() - start
        truth = flat.search(xq, 10)[1]
        rows.append(_measure(flat, "exact", n, dim, xq, truth, flat_build, {}))
        nlist = nlist_for(n)
        start = time.perf_counter()
        ivf = faiss.index_cpu_to_gpu(res, 0, faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT))
        ivf.train(xb)
        ivf.add(xb)
        build_s = time.perf_counter() - start
        for nprobe in [2**i for i in range(int(np.log2(nlist)) + 1)] + [nlist]:
            faiss.GpuParameterSpace().set_index_parameter(ivf, "nprobe", min(nprobe, 2048))
            if recall_at(ivf.search(xq, 10)[1], truth) >= target:
                break
        rows.append(_measure(ivf, f"ivf{nlist}", n, dim, xq, truth, build_s, {"nprobe": min(nprobe, 2048)}))
        del flat, ivf, xb
    return rows


def _measure(index, kind, n, dim, xq, truth, build_s, params) -> dict:
    lat = search_speed.latencies_ms(index, xq[:200])
    start = time.perf_counter()
    found = index.search(xq, 10)[1]
    batch_s = time.perf_counter() - start
    row = {
        "n": n,
        "dim": dim,
        "kind": kind,
        "params": params,
        "build_s": round(build_s, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "batch_queries": len(xq),
        "batch_s": round(batch_s, 4),
        "recall_at_10": round(recall_at(found, truth), 4),
    }
    print(f"  GPU FAISS {row}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes; runs on a CPU-only machine too")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds after which no new section starts")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_bench.json")
    args = parser.parse_args()
    start = time.perf_counter()
    report: dict = {
        "facts": {
            "host": platform.node() and platform.machine(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "faiss": faiss.__version__,
            "faiss_gpus": faiss.get_num_gpus(),
            "quick": args.quick,
        },
        "skipped": [],
    }

    def section(name: str, why_not: str | None, fn) -> None:
        elapsed = time.perf_counter() - start
        if why_not is None and elapsed > args.budget:
            why_not = f"time budget spent ({elapsed:.0f} s > {args.budget:.0f} s)"
        if why_not:
            print(f"[skip] {name}: {why_not}", flush=True)
            report["skipped"].append({"section": name, "reason": why_not})
            return
        print(f"[run] {name} (t = {elapsed:.0f} s)", flush=True)
        report[name] = fn()

    no_cuda = None if torch.cuda.is_available() else "no CUDA device (torch.cuda.is_available() is False)"
    for amp in ("none", "bf16"):
        section(
            f"encoders_cuda_{'fp32' if amp == 'none' else 'bf16'}",
            no_cuda,
            lambda amp=amp: encoder_speed.run(
                device="cuda",
                amp=amp,
                repeats=3,
                quick=args.quick,
                out=args.out.with_name(f"encoder_speed_cuda_{amp}.json"),
            ),
        )
    no_gpu_faiss = None if faiss.get_num_gpus() > 0 else "FAISS sees no GPU (faiss-cpu, or no CUDA device)"
    section(
        "faiss_gpu",
        no_gpu_faiss,
        lambda: gpu_faiss(
            sizes=[2000] if args.quick else [100_000, 1_000_000],
            dim=64 if args.quick else 768,
            n_queries=100 if args.quick else 1000,
            target=0.95,
        ),
    )
    section(
        "faiss_cpu",
        None,
        lambda: [
            row
            for n in ([2000] if args.quick else [10_000, 100_000])
            for row in search_speed.bench_size(
                n, dim=64 if args.quick else 768, n_queries=100 if args.quick else 500, target=0.95, seed=0
            )
        ],
    )
    section(
        "embed_workers",
        None if (torch.cuda.is_available() or args.quick) else no_cuda,
        lambda: embed_speed.run(
            n=4 if args.quick else 32,
            matrix=64 if args.quick else 256,
            thickness=(0.5, 5.0),
            model="vit-micro" if args.quick else "vit-base",
            batch_size=8,
            workers=[0, 1] if args.quick else [1, 2, 4, 8, 14],
            threads=[1 if args.quick else 2],
            device="cuda" if torch.cuda.is_available() else "cpu",
            # preprocessing in the workers, then on the GPU (the workers only decode); "cpu" exercises that
            # path on a machine without one
            preprocess_devices=(None, "cuda") if torch.cuda.is_available() else (None, "cpu"),
        ),
    )
    if args.quick and no_cuda:  # still exercise the encoder measurement end to end, on the CPU
        section(
            "encoders_cpu_quick",
            None,
            lambda: encoder_speed.run(
                device="cpu", amp="none", repeats=1, quick=True, out=args.out.with_name("encoder_speed_cpu_quick.json")
            ),
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    for name, value in report.items():
        if isinstance(value, str):
            print(f"\n{name}\n{value}")
    print(f"\nwrote {args.out} in {report['seconds']} s; skipped: {[s['section'] for s in report['skipped']]}")


if __name__ == "__main__":
    main()
