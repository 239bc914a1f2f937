"""End-to-end embedding: `embed_archive` (DataLoader workers overlap decoding/resampling with the model)
against the same stages run one after another in one process, measured in the same run.

    python benchmarks/embed_speed.py [--n 16] [--matrix 512] [--thickness 0.5 5] [--model vit-base]
                                     [--workers 0 1 2] [--threads 1 2]

Writes a synthetic archive to a temporary folder (``--thickness``: the range slice thicknesses are drawn
from), then times:
* serial:   for each scan: load -> preprocess -> encode (batch 1), model loaded once, all torch threads;
* embed_archive for each ``--workers`` x ``--threads`` (torch threads of the encoding process; workers
  always use one), batch ``--batch-size``, into a fresh DuckDB each time.
Prints seconds, scans/s and the speed-up over serial; writes JSON to benchmarks/results/embed_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from hctembed.embedding.run import embed_archive
from hctembed.index.store import Store
from hctembed.io.archive import discover
from hctembed.model.encoders import load_encoder
from hctembed.preprocessing.series import prepare
from hctembed.synth import SynthConfig, generate_archive


def run(
    *,
    n: int,
    matrix: int,
    thickness: tuple[float, float],
    model: str,
    batch_size: int,
    workers: list[int],
    threads: list[int],
    device: str = "cpu",
    preprocess_devices: tuple[str | None, ...] = (None,),
) -> list[dict]:
    """Serial stages, then ``embed_archive`` for each workers x threads x preprocessing device (None: in the
    DataLoader workers; "cuda": the workers only decode); rows with seconds, ratios and CPU-seconds per scan
    (this process and its workers together: the core-seconds a scan costs)."""
    all_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        config = SynthConfig(matrix=matrix, slice_thickness_mm=tuple(thickness))
        generate_archive(archive, n=n, seed=7, config=config)
        refs = discover(archive)
        encoder = load_encoder(model, seed=0).to(device)
        encoder.encode(torch.zeros(1, encoder.preprocess.channels, *(encoder.preprocess.out_size,) * 3))  # warm-up

        start = time.perf_counter()
        for ref in refs:  # the same stages as embed_archive (prepare = load + preprocess), one after another
            x, _ = prepare(ref, config=encoder.preprocess)
            encoder.encode(x[None])
        serial = time.perf_counter() - start
        rows = [
            {
                "mode": "serial",
                "workers": 0,
                "threads": all_threads,
                "seconds": round(serial, 2),
                "scans_per_s": round(len(refs) / serial, 3),
                "speedup": 1.0,
            }
        ]
        print(rows[-1], flush=True)
        for pre in preprocess_devices:
            for w in workers:
                for t in threads:
                    torch.set_num_threads(t)
                    db = Path(tmp) / f"w{w}t{t}{pre or ''}.duckdb"
                    with Store(db) as store:
                        cpu_start, start = _cpu_seconds(), time.perf_counter()
                        report = embed_archive(
                            refs=refs, encoder=encoder, store=store, batch_size=batch_size, num_workers=w,
                            preprocess_device=pre,
                        )  # fmt: skip
                        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
                    torch.set_num_threads(all_threads)
                    assert report.embedded == len(refs), report
                    rows.append(
                        {
                            "mode": "embed_archive",
                            "preprocess": pre or "cpu workers",
                            "workers": w,
                            "threads": t,
                            "seconds": round(seconds, 2),
                            "scans_per_s": round(len(refs) / seconds, 3),
                            "cpu_s_per_scan": round(cpu / len(refs), 3),
                            "speedup": round(serial / seconds, 2),
                        }
                    )
                    print(rows[-1], flush=True)
    return rows


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers), user + system."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--thickness", type=float, nargs=2, default=[0.5, 5.0])
    parser.add_argument("--model", default="vit-base")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = run(
        n=args.n,
        matrix=args.matrix,
        thickness=tuple(args.thickness),
        model=args.model,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
    )
    print(
        f"{args.n} scans, matrix {args.matrix}, slices {args.thickness[0]:g}-{args.thickness[1]:g} mm, {args.model}, "
        f"batch {args.batch_size}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'mode':16} {'workers':>7} {'threads':>7} {'seconds':>8} {'scans/s':>8} {'vs serial':>10}")
    for r in rows:
        print(
            f"{r['mode']:16} {r['workers']:7d} {r['threads']:7d} {r['seconds']:8.2f} {r['scans_per_s']:8.3f} "
            f"{r['speedup']:9.2f}x"
        )
    out = Path(__file__).parent / "results" / "embed_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
