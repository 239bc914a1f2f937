"""Does pretraining learn? vit-micro pretrained with DINO and with MAE on a synthetic archive (CPU), then
all-vs-all retrieval mAP per subtype on held-out patients, against the same encoder random-initialised
and a hand-crafted baseline (the normalised HU histogram inside the head).

    python benchmarks/pretrain_synthetic.py [--n 48] [--dino-steps 100] [--mae-steps 200] [--out DIR]

About 5-10 minutes on 2 CPU cores. Prints a table; writes benchmarks/results/pretrain_synthetic.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hctembed.config import VIT_PRESETS, PreprocessConfig
from hctembed.eval.retrieval import all_vs_all
from hctembed.io.archive import discover, load_series
from hctembed.io.labels import read_labels
from hctembed.model.vit3d import ViT3D
from hctembed.preprocessing import preprocess
from hctembed.preprocessing.resample import foreground_bounds, isotropic_grid, resample_isotropic
from hctembed.pretrain import PretrainConfig, run_pretrain
from hctembed.pretrain.mae import MAEConfig
from hctembed.synth import generate_archive
from hctembed.synth.protocol import SynthConfig

SUBTYPES = ["EDH", "SDH", "IPH", "IVH", "SAH"]


def hu_histogram(volume) -> np.ndarray:
    """Normalised histogram (2 HU bins, -20..120 HU) of the voxels inside the head's box, square-rooted."""
    hu = resample_isotropic(volume, grid=isotropic_grid(volume, spacing_mm=2.0))
    (x0, y0, z0), (x1, y1, z1) = foreground_bounds(hu, threshold=-500.0)
    inside = hu[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1].numpy().ravel()
    h, _ = np.histogram(inside, bins=70, range=(-20, 120))
    return np.sqrt(h / max(h.sum(), 1))


def evaluate(name: str, x: np.ndarray, table, ids: list[str], patients: list[str]) -> dict:
    rep = all_vs_all(x, table.for_scans(ids), label_names=table.names, patient_ids=patients, exclude_same_patient=True)
    row = {"method": name, **{lab.label: lab.mAP for lab in rep.labels}, "mean": rep.mean()["mAP"]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--dino-steps", type=int, default=100)
    ap.add_argument("--mae-steps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench-pretrain"))
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "pretrain_synthetic.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    archive = args.out / "archive"
    if not (archive / "labels.csv").exists():
        generate_archive(archive, n=args.n, seed=11, config=SynthConfig(matrix=64))
    table = read_labels(archive / "labels.csv", columns=SUBTYPES)
    patients_of = table.patients()
    refs = discover(archive)
    pids = sorted({patients_of[r.scan_id] for r in refs})
    held = set(pids[::2])  # every second patient is held out
    train = [r for r in refs if patients_of[r.scan_id] not in held]
    test = [r for r in refs if patients_of[r.scan_id] in held]
    print(f"{len(train)} training scans, {len(test)} held-out scans ({len(held)} patients)")

    vit = VIT_PRESETS["vit-micro"]
    eval_pp = PreprocessConfig(out_size=vit.image_size)
    volumes = [load_series(r) for r in test]
    inputs = torch.stack([preprocess(v, config=eval_pp) for v in volumes])
    ids = [r.scan_id for r in test]
    patients = [patients_of[i] for i in ids]

    def embed(model: ViT3D) -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([model.eval().embed(inputs[i : i + 8]) for i in range(0, len(inputs), 8)]).numpy()

    rows, seconds = [], {}
    common = PretrainConfig(
        model="vit-micro", batch_size=4, prototypes=1024, head_hidden=512, bottleneck=128, local_crops=2,
        lr=1e-3, checkpoint_every=10_000, mae=MAEConfig(decoder_dim=96, decoder_depth=2, decoder_heads=4),
    )  # fmt: skip
    steps_per_epoch = len(train) // 4
    for method, steps in (("dino", args.dino_steps), ("mae", args.mae_steps)):
        config = replace(common, method=method, epochs=-(-steps // steps_per_epoch), max_steps=steps)
        t = time.perf_counter()
        result = run_pretrain(refs=train, config=config, out=args.out / method, cache_dir=args.out / "cache")
        seconds[method] = round(time.perf_counter() - t, 1)
        rows.append(evaluate(f"{method.upper()} ({steps} steps)", embed(result.backbone), table, ids, patients))
    torch.manual_seed(0)
    rows.append(evaluate("random init", embed(ViT3D(vit)), table, ids, patients))
    rows.append(evaluate("HU histogram", np.stack([hu_histogram(v) for v in volumes]), table, ids, patients))

    cols = ["method", *SUBTYPES, "mean"]
    print(" | ".join(f"{c:>20}" if c == "method" else f"{c:>6}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>20}" if c == "method" else f"{r[c]:6.3f}" for c in cols))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "train_scans": len(train),
        "held_out_scans": len(test),
        "pretrain_seconds": seconds,
        "metric": "mAP, all-vs-all, same patient excluded, held-out patients only",
        "rows": rows,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
