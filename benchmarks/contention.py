"""Preprocessing on a busy machine: the same call quiet, and with competing busy processes, in one run.

Writes a synthetic 512x512 head CT (``--thickness`` mm slices) as ``.nii.gz``, then times
``hctembed.preprocessing.series.prepare`` (what ``embed`` runs per scan) ``--repeats`` times each:

* ``quiet``: nothing else running;
* ``busy``: ``--busy`` other processes spinning on the CPU meanwhile (as DataLoader workers beside the
  encoder, or other jobs on a shared node do).

Also reports the first call in a fresh process against a later one (``first_call``), and the CPU time of one
call. With ``--embed-scans N``, ``embed_archive`` (one DataLoader worker, as ``hctembed embed`` runs by
default; ``--embed-model``) over a synthetic archive of N scans, quiet and busy, median of 3 runs: the
throughput under contention. Prints median and max seconds and the busy / quiet ratio of the medians; writes
``benchmarks/results/contention.json``.

    python benchmarks/contention.py [--repeats 5] [--busy 2] [--thickness 5] [--embed-scans 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from preprocess_speed import write_case

from hctembed.allocator import retain_freed_memory
from hctembed.config import PreprocessConfig
from hctembed.io.archive import discover
from hctembed.preprocessing.series import prepare


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


FIRST_CALL = """
import sys, time
from hctembed.allocator import retain_freed_memory
from hctembed.config import PreprocessConfig
from hctembed.io.archive import discover
from hctembed.preprocessing.series import prepare
retain_freed_memory()
(ref,) = discover(sys.argv[1])
times = []
for _ in range(3):
    start = time.perf_counter()
    prepare(ref, config=PreprocessConfig(), head_check=True)
    times.append(time.perf_counter() - start)
print(times[0], min(times[1:]))
"""


def first_call(path: Path) -> tuple[float, float]:
    """The first and the best later call in a fresh process (imports already done)."""
    out = subprocess.run([sys.executable, "-c", FIRST_CALL, str(path)], capture_output=True, text=True, check=True)
    first, later = map(float, out.stdout.split())
    return first, later


class Busy:
    """``n`` processes spinning on the CPU while the block runs."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.stop = mp.Event()
        self.spinners = [mp.Process(target=_spin, args=(self.stop,), daemon=True) for _ in range(self.n)]
        for p in self.spinners:
            p.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.spinners:
            p.join(timeout=5)


def embed_throughput(folder: Path, *, n: int, model: str, busy: int) -> dict:
    """Scans per second of ``embed_archive`` over ``n`` synthetic scans, quiet and beside ``busy`` spinning
    processes (median of 3 runs each, a fresh database per run)."""
    from hctembed.embedding.run import embed_archive
    from hctembed.index.store import Store
    from hctembed.model.encoders import load_encoder
    from hctembed.synth import SynthConfig, generate_archive

    archive = folder / "archive"
    generate_archive(archive, n=n, seed=7, config=SynthConfig(matrix=256))
    refs = discover(archive)
    encoder = load_encoder(model, seed=0)
    runs = iter(range(1000))

    def once() -> float:
        with Store(folder / f"run{next(runs)}.duckdb") as store:
            start = time.perf_counter()
            report = embed_archive(refs=refs, encoder=encoder, store=store, batch_size=4, num_workers=1)
            seconds = time.perf_counter() - start
        assert report.embedded == n, report
        return n / seconds

    once()  # warm-up
    quiet = statistics.median(once() for _ in range(3))
    with Busy(busy):
        loaded = statistics.median(once() for _ in range(3))
    return {"model": model, "scans": n, "quiet_scans_per_s": round(quiet, 3), "busy_scans_per_s": round(loaded, 3),
            "quiet_over_busy": round(quiet / loaded, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy", type=int, default=2)
    parser.add_argument("--thickness", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--embed-scans", type=int, default=0, help="also embed_archive throughput over N scans")
    parser.add_argument("--embed-model", default="vit-small")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # as every hctembed command and embedding worker does
    config = PreprocessConfig()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, _, _ = write_case(Path(tmp), matrix=512, thickness=args.thickness, seed=1)
        (ref,) = discover(path)

        def call():
            return prepare(ref, config=config, head_check=True)

        call()  # warm-up
        cpu_start = time.process_time()
        quiet = timed(call, args.repeats)
        cpu = (time.process_time() - cpu_start) / args.repeats
        with Busy(args.busy):
            busy = timed(call, args.repeats)
        firsts = [first_call(path) for _ in range(3)]
        embed = (
            embed_throughput(Path(tmp), n=args.embed_scans, model=args.embed_model, busy=args.busy)
            if args.embed_scans
            else None
        )
    rows = {
        "file": path.name,
        "torch_threads": torch.get_num_threads(),
        "quiet_median_s": round(statistics.median(quiet), 3),
        "quiet_max_s": round(max(quiet), 3),
        "busy_processes": args.busy,
        "busy_median_s": round(statistics.median(busy), 3),
        "busy_max_s": round(max(busy), 3),
        "busy_over_quiet": round(statistics.median(busy) / statistics.median(quiet), 2),
        "cpu_s_per_call": round(cpu, 3),
        "first_call_s": round(statistics.median(f for f, _ in firsts), 3),
        "later_call_s": round(statistics.median(later for _, later in firsts), 3),
        "first_over_later": round(statistics.median(f / later for f, later in firsts), 2),
        "embed_archive": embed,
    }
    print(json.dumps(rows, indent=1))
    facts = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__}
    out = Path(__file__).parent / "results" / "contention.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "row": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
