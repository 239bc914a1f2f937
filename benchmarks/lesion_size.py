"""Where does frozen search start to carry a finding? Frozen retrieval and linear probes as the bleeds grow.

For each lesion scale S (``hctembed synth --lesion-scale S``: every bleed's linear size times S, the same random
draws, so the same patients, scans, subtypes and split at every S; S = 1 is the default archive bit for bit), the
1,200-scan protocol of ``learning_synthetic.py``: the patient-level 8:1:1 split (seed 0), the held-out patients'
scans never seen by pretraining. Each scan's embedding-time input goes through a random-initialised encoder (same
configuration and input handling) and the given pretrained one; reported per scale, on the mean over the five
subtypes and per subtype: all-vs-all retrieval mAP among the held-out scans (same patient excluded) and a linear
probe's test AUC, with bootstrap 95 % CIs and paired permutation P values against random init.

The pretrained encoder is one encoder (``--encoder``, pretrained on the S = 1 archive's training and validation
patients); larger S changes only the bleeds it is shown, not what it was trained on. Scales are fixed here before
any run. Writes OUT/lesion_size.json, prints a table, and draws ``--figure`` (default
docs/learning/lesion_size.png).

    .venv/bin/python benchmarks/lesion_size.py --out bench-out/lesion --encoder RUN/encoder.safetensors \\
        --archive-1 bench-out/learning/archive --cache-1 bench-out/learning/cache   # ~15 min a scale, one core
    .venv/bin/python benchmarks/lesion_size.py --out /tmp/ls --budget toy  # smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

log = logging.getLogger("lesion_size")

SCALES = (1.0, 1.5, 2.0, 3.0)  # fixed before any run: the default, then IPH volume x3.4, x8 and x27
BUDGETS = {
    "full": {"n": 1200, "matrix": 128, "model": "vit-micro"},
    "toy": {"n": 40, "matrix": 64, "model": "vit-micro"},
}
SUBTYPES = ("EDH", "SDH", "IPH", "IVH", "SAH")


def archive_at(args, scale: float, budget: dict) -> Path:
    from hctembed.synth import SynthConfig, generate_archive

    if scale == 1.0 and args.archive_1 is not None:
        return args.archive_1
    folder = args.out / f"archive_{scale:g}"
    if not (folder / "labels.csv").exists():
        generate_archive(folder, n=budget["n"], seed=args.seed, workers=args.workers,
                         config=SynthConfig(matrix=budget["matrix"], lesion_scale=scale))  # fmt: skip
    return folder


def per_subtype(result: dict, metric: str) -> dict[str, dict[str, float | None]]:
    """``{model: {subtype or 'mean': value}}`` from a protocol's rows."""
    out: dict[str, dict[str, float | None]] = {}
    for row in result["rows"]:
        out.setdefault(row["model"], {})[row["row"]] = (row["metrics"].get(metric) or {}).get("value")
    return out


def draw(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "retrieval_map", "retrieval mAP (held-out scans)"),
                           (axes[1], "linear_auc", "linear-probe test AUC")):  # fmt: skip
        models = list(rows[0][key])
        for i, model in enumerate(models):
            scales = [r["scale"] for r in rows]
            est = [r[key][model]["estimate"] for r in rows]
            values = np.array([e["value"] for e in est], float)
            low = np.array([e.get("low") if e.get("low") is not None else e["value"] for e in est], float)
            high = np.array([e.get("high") if e.get("high") is not None else e["value"] for e in est], float)
            ax.plot(scales, values, "o-", color=f"C{i}", label=model)
            ax.fill_between(scales, low, high, color=f"C{i}", alpha=0.15)
            for s, r in zip(scales, rows, strict=True):
                p = r[key][model]["p"]
                if p is not None and p < 0.05:
                    ax.annotate("*", (s, r[key][model]["estimate"]["value"]), textcoords="offset points",
                                xytext=(0, 6), ha="center", color=f"C{i}")  # fmt: skip
        ax.set_xlabel("lesion scale (linear size x default; IPH volume x scale³)")
        ax.set_title(label + ", mean of 5 subtypes")
        ax.legend()
    fig.suptitle("Frozen vit-micro embeddings as the bleeds grow (* P < 0.05 against random init)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--encoder", type=Path, default=None, help="the pretrained encoder (default: toy DINO run)")
    parser.add_argument("--name", default="pretrained", help="the pretrained encoder's name in the tables")
    parser.add_argument("--archive-1", type=Path, default=None, help="an existing scale-1 archive (same n and seed)")
    parser.add_argument("--cache-1", type=Path, default=None, help="that archive's base-volume cache, if built")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--scales", default=",".join(f"{s:g}" for s in SCALES))
    parser.add_argument("--figure", type=Path, default=Path("docs/learning/lesion_size.png"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.workers)
    budget = BUDGETS[args.budget]
    args.out.mkdir(parents=True, exist_ok=True)

    from gpu_learning import frozen, mean_row, random_like

    from hctembed.eval.splits import patient_split
    from hctembed.model.checkpoint import load_encoder_weights
    from hctembed.workflows.finetune import labelled_cache
    from hctembed.workflows.progress import NO_PROGRESS

    scales = [float(s) for s in args.scales.split(",")]
    if args.encoder is None:  # the toy run pretrains a few DINO steps on the scale-1 archive
        from gpu_learning import dino_config

        from hctembed.workflows.pretrain import pretrain_archive

        config, _ = dino_config(model=budget["model"], batch=4, epochs=1, seed=args.seed, workers=0, prototypes=256)
        args.encoder = pretrain_archive(archive_at(args, scales[0], budget), config=config, out=args.out / "toy_run",
                                        cache_dir=args.out / "cache_toy", device="cpu").encoder_path  # fmt: skip
    encoder = load_encoder_weights(args.encoder)[0]
    encoders = {"random init": random_like(encoder, seed=args.seed), args.name: encoder}
    size = encoder.config.image_size  # the input both encoders take
    rows = []
    for scale in scales:
        start = time.perf_counter()
        archive = archive_at(args, scale, budget)
        cache = args.cache_1 if scale == 1.0 and args.cache_1 is not None else args.out / f"cache_{scale:g}"
        data = labelled_cache(archive, archive / "labels.csv", tasks=SUBTYPES, image_size=size, cache=cache,
                              progress=NO_PROGRESS)  # fmt: skip
        split = patient_split(list(data.patient_ids), ratios=(0.8, 0.1, 0.1), seed=args.seed)
        result = frozen(data, split, encoders, device="cpu", seed=args.seed)
        rows.append({
            "scale": scale, "scans": len(data.scan_ids), "test_scans": len(split.test),
            "positives_test": {t: int(data.y[split.test, i].sum()) for i, t in enumerate(SUBTYPES)},
            "retrieval_map": mean_row(result["retrieval"], "mAP"), "linear_auc": mean_row(result["linear"], "AUC"),
            "retrieval_per_subtype": per_subtype(result["retrieval"], "mAP"),
            "linear_per_subtype": per_subtype(result["linear"], "AUC"), "full": result,
            "seconds": round(time.perf_counter() - start, 1),
        })  # fmt: skip
        log.info("scale %g done in %.0f s", scale, rows[-1]["seconds"])
        (args.out / "lesion_size.json").write_text(json.dumps({"encoder": str(args.encoder), "rows": rows}, indent=2))
    print("| lesion scale | model | retrieval mAP [95% CI] | P | linear AUC [95% CI] | P |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for model in encoders:
            m, a = r["retrieval_map"][model], r["linear_auc"][model]

            def fmt(e):
                e = e or {}
                if e.get("value") is None:
                    return "–"
                return f"{e['value']:.3f}" + (f" [{e['low']:.3f}, {e['high']:.3f}]" if e.get("low") is not None else "")

            def p(x):
                return "" if x is None else f"{x:.3g}"

            print(f"| {r['scale']:g} | {model} | {fmt(m['estimate'])} | {p(m['p'])} | {fmt(a['estimate'])} | "
                  f"{p(a['p'])} |")  # fmt: skip
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    draw(args.figure, rows)
    return {"encoder": str(args.encoder), "rows": rows}


if __name__ == "__main__":
    main()
