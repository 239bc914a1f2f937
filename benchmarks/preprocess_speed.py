"""Preprocessing speed: hctembed's fast path vs the plain MONAI chain, measured in the same run.

Writes synthetic 512x512xN head CTs as .nii.gz (0.45 mm in-plane; 5 mm and 1 mm slices), then times
for each file, median of ``--repeats``:

* ``decode``      nibabel load + gzip inflate + int16 -> float32 (the floor any path pays);
* ``fast``        hctembed: ``load_nifti`` + ``preprocess`` (separable cubic spline);
* ``reference``   MONAI: ``LoadImage`` + Orientation -> Spacing(1 mm, spline 3) -> CropForeground ->
                  windows -> ResizeWithPadOrCrop(224) -> CenterSpatialCrop(192) -> Resize(96, area).

Prints a table with the speed-up (reference / fast), fast / decode, core-seconds per scan and the mean
|difference| between the two outputs; writes JSON to ``benchmarks/results/preprocess_speed.json``.

    python benchmarks/preprocess_speed.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from hctembed.config import PreprocessConfig
from hctembed.io.nifti import load_nifti
from hctembed.preprocess import preprocess, reference_chain
from hctembed.synth import SynthConfig, make_patient, sample_protocol, save_nifti, synth_scan


def write_case(folder: Path, *, matrix: int, thickness: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    patient = make_patient(patient_id="bench", subtypes=frozenset({"IPH", "SDH"}), rng=rng)
    config = SynthConfig(matrix=matrix, fov_mm=230.0, slice_thickness_mm=(thickness, thickness), max_rotation_deg=3.0)
    protocol = sample_protocol(rng=rng, config=config)
    hu, affine = synth_scan(patient=patient, protocol=protocol, rng=rng)
    path = folder / f"head_{matrix}_{thickness:g}mm.nii.gz"
    save_nifti(path, hu=hu, affine=affine)
    return path


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256x256 in-plane, one repeat (a smoke run)")
    args = parser.parse_args()
    matrix, repeats = (256, 1) if args.quick else (512, args.repeats)
    from monai.transforms import LoadImage

    config = PreprocessConfig()
    chain = reference_chain(config)
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for thickness in (5.0, 1.0):
            path = write_case(Path(tmp), matrix=matrix, thickness=thickness, seed=1)
            img_shape = nib.load(str(path)).shape
            preprocess(load_nifti(path), config=config)  # warm-up: imports, allocator

            def decode(path=path):
                return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)

            def fast(path=path):
                return preprocess(load_nifti(path), config=config)

            def reference(path=path):
                return chain(loader(str(path)))

            t_decode, _ = timed(decode, repeats)
            t_fast, x_fast = timed(fast, repeats)
            t_ref, x_ref = timed(reference, repeats)
            x_ref = x_ref.as_tensor().permute(0, 3, 2, 1)
            mad = float((x_fast - x_ref).abs().mean())
            rows.append(
                {
                    "file": path.name,
                    "shape_xyz": list(img_shape),
                    "decode_s": round(t_decode, 3),
                    "fast_s": round(t_fast, 3),
                    "reference_s": round(t_ref, 3),
                    "speedup": round(t_ref / t_fast, 1),
                    "fast_over_decode": round(t_fast / t_decode, 2),
                    "fast_core_s_per_scan": round(t_fast * threads, 2),
                    "mean_abs_diff": mad,
                }
            )
    header = (
        f"{'file':28} {'decode s':>9} {'fast s':>8} {'MONAI s':>8} {'speed-up':>9} {'fast/decode':>12} "
        f"{'core-s':>7} {'mean|Δ|':>9}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['file']:28} {r['decode_s']:9.3f} {r['fast_s']:8.3f} {r['reference_s']:8.3f} {r['speedup']:8.1f}x "
            f"{r['fast_over_decode']:11.2f}x {r['fast_core_s_per_scan']:7.2f} {r['mean_abs_diff']:9.2e}"
        )
    facts = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
    }
    out = Path(__file__).parent / "results" / "preprocess_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
