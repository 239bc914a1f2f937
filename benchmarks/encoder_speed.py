"""Encoder speed: vit-base at 96³ against this machine's matmul rate, and Merlin / CT-FM per-scan cost.

Measured in one run, batch 1, fp32 (``--device cuda`` and ``--autocast bf16`` for a GPU; on a CPU without
AVX-512 bf16 autocast is ~10x slower, so it is never the CPU default):

* the matmul rate: a square fp32 ``torch.mm`` (4096²), GFLOP/s — the baseline the ViT is compared with;
* vit-base: volumes/s and its achieved GFLOP/s, from FLOPs counted analytically (patch embedding, qkv,
  attention scores and mix, projection, MLP; multiply-adds count 2), as a fraction of the matmul rate;
* Merlin (I3D ResNet-152, input [1, 1, 224, 224, 160]) and CT-FM (SegResEncoder, [1, 1, 192, 192, 192])
  with random weights (``load_encoder(name, random_init=True)``): seconds per scan;
* each model's own preprocessing (``preprocess(volume, config=encoder.preprocess)``) of one synthetic
  512×512 head CT (0.45 mm in-plane, 5 mm slices) loaded with ``load_nifti``: seconds per scan.

    python benchmarks/encoder_speed.py [--repeats 2] [--device cpu|cuda] [--autocast none|bf16] [--quick]

Writes JSON to ``benchmarks/results/encoder_speed.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hctembed.config import VIT_PRESETS, ViTConfig
from hctembed.io.nifti import load_nifti
from hctembed.model.encoders import load_encoder
from hctembed.preprocessing import preprocess
from hctembed.synth import SynthConfig, make_patient, sample_protocol, save_nifti, synth_scan

FOREIGN_INPUTS = {"merlin": (1, 1, 224, 224, 160), "ct-fm": (1, 1, 192, 192, 192)}


def vit_flops(config: ViTConfig) -> float:
    """Forward FLOPs of one volume (multiply-add = 2): patch embedding + ``depth`` pre-norm blocks."""
    n = (config.image_size // config.patch_size) ** 3
    t = n + 1 + config.register_tokens
    d, m = config.dim, config.mlp_dim
    patch = 2 * n * config.in_channels * config.patch_size**3 * d
    block = 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * m
    return float(patch + config.depth * block)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, *, repeats: int, device: str, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(*, device: str, n: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(timed(lambda: torch.mm(a, b), repeats=repeats, device=device))
    return 2 * n**3 / best / 1e9


def autocast(device: str, dtype: str):
    if dtype == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)


def time_encoder(name: str, shape, *, device: str, repeats: int, warmup: int, amp: str, seed: int = 0) -> dict:
    encoder = load_encoder(name, seed=seed, random_init=True if name in FOREIGN_INPUTS else None).to(device)
    encoder.model.eval()
    x = torch.randn(*shape, device=device)

    def forward():
        with autocast(device, amp):
            encoder.encode(x)

    times = timed(forward, repeats=repeats, device=device, warmup=warmup)
    return {
        "model": name,
        "input": list(shape),
        "device": device,
        "autocast": amp,
        "repeats": repeats,
        "warmup": warmup,
        "seconds_per_scan": round(statistics.median(times), 3),
        "times": [round(t, 3) for t in times],
        "params_m": round(sum(p.numel() for p in encoder.model.parameters()) / 1e6, 1),
        "encoder": encoder,
    }


def synthetic_head_ct(folder: Path, *, matrix: int, thickness: float = 5.0, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    patient = make_patient(patient_id="bench", subtypes=frozenset({"IPH", "SDH"}), rng=rng)
    config = SynthConfig(matrix=matrix, fov_mm=230.0, slice_thickness_mm=(thickness, thickness), max_rotation_deg=3.0)
    hu, affine = synth_scan(patient=patient, protocol=sample_protocol(rng=rng, config=config), rng=rng)
    path = folder / f"head_{matrix}_{thickness:g}mm.nii.gz"
    save_nifti(path, hu=hu, affine=affine)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--quick", action="store_true", help="smoke run: vit-micro, a 128² CT, no Merlin / CT-FM")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "encoder_speed.json")
    args = parser.parse_args()
    print(run(device=args.device, amp=args.autocast, repeats=args.repeats, quick=args.quick, out=args.out))


def run(*, device: str, amp: str, repeats: int, quick: bool, out: Path) -> str:
    """Run every measurement, write ``out`` (JSON) and return the printed table."""
    load_at_start = os.getloadavg()[0]
    torch.manual_seed(0)
    vit_name = "vit-micro" if quick else "vit-base"
    vit = VIT_PRESETS[vit_name]
    rate = matmul_gflops(device=device, n=1024 if quick else 4096, dtype=torch.float32)
    rate_bf16 = matmul_gflops(device=device, n=1024 if quick else 4096, dtype=torch.bfloat16) if amp == "bf16" else None
    rows = [
        time_encoder(
            vit_name,
            (1, vit.in_channels, *(vit.image_size,) * 3),
            device=device,
            repeats=max(repeats, 3),
            warmup=1,
            amp=amp,
        )
    ]
    flops = vit_flops(vit)
    rows[0] |= {
        "gflop_per_scan": round(flops / 1e9, 1),
        "volumes_per_s": round(1 / rows[0]["seconds_per_scan"], 2),
        "achieved_gflops": round(flops / rows[0]["seconds_per_scan"] / 1e9, 1),
    }
    rows[0]["fraction_of_matmul"] = round(rows[0]["achieved_gflops"] / (rate_bf16 if amp == "bf16" else rate), 2)
    if not quick:
        slow_cpu = device == "cpu"
        for name, shape in FOREIGN_INPUTS.items():
            # Merlin takes ~30 s per forward on a 2-core CPU: one timed forward, no warm-up there
            reps, warm = (1, 0) if slow_cpu and name == "merlin" else (repeats, 1)
            rows.append(time_encoder(name, shape, device=device, repeats=reps, warmup=warm, amp=amp))
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_head_ct(Path(tmp), matrix=128 if quick else 512)
        volume = load_nifti(path)
        for row in rows:
            config = row["encoder"].preprocess
            times = timed(lambda config=config: preprocess(volume, config=config), repeats=repeats, device="cpu")
            row["preprocess_s"] = round(statistics.median(times), 3)
            row["preprocess_volume"] = list(volume.array.shape)
    for row in rows:
        del row["encoder"]
    threads = torch.get_num_threads()
    facts = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "matmul_fp32_gflops": round(rate, 1),
        "matmul_bf16_gflops": round(rate_bf16, 1) if rate_bf16 else None,
        "load_average_at_start": load_at_start,
        "quick": quick,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    size = 1024 if quick else 4096
    lines = [f"matmul fp32 {size}²: {rate:.1f} GFLOP/s on {facts['device']} ({threads} torch threads)"]
    lines.append(f"{'model':10} {'input':22} {'s/scan':>8} {'scans/s':>8} {'preprocess s':>13} {'of matmul':>10}")
    for r in rows:
        frac = f"{r['fraction_of_matmul']:.2f}" if "fraction_of_matmul" in r else "-"
        lines.append(
            f"{r['model']:10} {'x'.join(map(str, r['input'][1:])):22} {r['seconds_per_scan']:8.3f} "
            f"{1 / r['seconds_per_scan']:8.2f} {r['preprocess_s']:13.3f} {frac:>10}"
        )
    if rows[0].get("achieved_gflops"):
        lines.append(
            f"{vit_name}: {rows[0]['gflop_per_scan']} GFLOP per volume, {rows[0]['achieved_gflops']} GFLOP/s achieved"
        )
    lines.append(f"wrote {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
