"""Does pretraining help? The evidence run of issue 12, on a synthetic archive the generator makes.

Stages (each one's result is kept as OUT/<stage>.json, so an interrupted run picks up where it stopped):

1. archive: ``hctembed synth`` (or ``--archive``, an existing archive with its labels.csv);
2. pretrain: MAE (and, with ``--dino-epochs`` / ``--simclr-epochs``, DINO / SimCLR) on the archive's scans through
   ``hctembed.workflows.pretrain`` (no labels reach the loss; the labelled monitor reads them only to log kNN AUC and
   mAP);
3. frozen: every scan's embedding-time input (the centre 192 mm of the cached 224 mm base, resized) through the
   random-initialised encoder and the pretrained ones, CLS token and mean patch token; all-vs-all retrieval mAP
   (same patient excluded) and a linear probe's test AUC per subtype with bootstrap CIs and paired permutation P
   values against random init; the HU histogram of the same input as a hand-made reference;
4. fewshot: fine-tuning from scratch against from the pretrained encoder at each K (``--draws`` draws), per task;
5. finetune: the same on the whole training part (the supervised bound for scratch);
6. contents (on request): what varies in each encoder's embeddings: the share of their variance between patients
   (beside its level with shuffled patient ids), the share the bleed labels explain linearly, and how often a scan's
   nearest neighbour is the same patient's.

Settings are fixed here before the run and nothing is tuned on the test part. Prints the tables and writes
OUT/summary.md.

    .venv/bin/python benchmarks/learning_synthetic.py --out bench-out/learning            # ~2 h on 2 cores
    .venv/bin/python benchmarks/learning_synthetic.py --out /tmp/l --budget quick         # ~5 min smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from hctembed.json_values import json_safe
from hctembed.workflows.progress import NO_PROGRESS

log = logging.getLogger("learning_synthetic")

BUDGETS = {
    "full": {"n": 1200, "matrix": 128, "mae_epochs": 30, "dino_epochs": 0, "ks": (8, 16, 32), "draws": 3,
             "k_epochs": 10, "k_samples": 64, "full_epochs": 60, "full_samples": 800},
    "quick": {"n": 48, "matrix": 96, "mae_epochs": 1, "dino_epochs": 0, "ks": (4,), "draws": 2,
              "k_epochs": 1, "k_samples": 16, "full_epochs": 1, "full_samples": 32},
}  # fmt: skip
SUBTYPES = ("EDH", "SDH", "IPH", "IVH", "SAH")


def stage(out: Path, name: str, run):
    """Run ``run()`` once; its JSON result is kept in OUT/<name>.json and reused by later invocations."""
    path = out / f"{name}.json"
    if path.exists():
        log.info("%s: reusing %s", name, path)
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = json_safe(run())
    result["seconds"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(result, indent=2))
    log.info("%s: done in %.0f s", name, result["seconds"])
    return result


def make_archive(args, budget) -> Path:
    from hctembed.synth import SynthConfig, generate_archive

    archive = args.archive or args.out / "archive"
    if not (archive / "labels.csv").exists():
        generate_archive(archive, n=budget["n"], seed=args.seed, config=SynthConfig(matrix=budget["matrix"]),
                         workers=args.threads)  # fmt: skip
    return archive


def pretrain_config(method: str, epochs: int, args):
    from hctembed.pretrain import PretrainConfig
    from hctembed.pretrain.mae import MAEConfig

    # a light decoder (96 wide, 2 blocks): the default 384 x 8 one is 5x the cost of vit-micro itself; per-patch
    # normalised targets (the MAE paper's better representation). DINO: BatchNorm head, no photometric jitter.
    # SimCLR: a batch of 16 scans (30 negatives per view), temperature 0.1
    lr = {"mae": args.mae_lr, "dino": args.dino_lr, "simclr": args.simclr_lr}[method]
    if method == "dino" and args.dino_recipe:
        return dino_recipe_config(epochs, args)
    return PretrainConfig(
        method=method, model=args.model, epochs=epochs, batch_size=16 if method == "simclr" else 8, lr=lr,
        checkpoint_every=100, monitor_every=200, local_crops=2, prototypes=4096, warmup_epochs=1.0,
        teacher_temp_warmup_epochs=max(1.0, epochs * 0.1), head_bn=method == "dino", intensity_jitter=method != "dino",
        mae=MAEConfig(decoder_dim=96, decoder_depth=2, decoder_heads=4, norm_pix_loss=args.mae_targets == "normalised",
                      target="histogram" if args.mae_targets == "histogram" else "pixels", mask_ratio=args.mask_ratio),
        seed=args.seed,
    )  # fmt: skip


def dino_recipe_config(epochs: int, args):
    """DINO as the paper and DINO's code run it (``pretrain --recipe fmhct``: inputs standardised per channel, lr by
    the linear rule at this batch of 8, teacher temperature 0.04 held, per-parameter clipping at 3, drop path 0.1,
    3 local crops, 65,536 prototypes), with DINO's BatchNorm head (issue 30's step 4); the labelled monitor every
    200 steps on the validation part is what the run is judged by."""
    from hctembed.pretrain import PretrainConfig
    from hctembed.pretrain.recipes import apply_recipe

    base = PretrainConfig(method="dino", model=args.model, epochs=epochs, batch_size=8, head_bn=True,
                          checkpoint_every=100, monitor_every=200, seed=args.seed)  # fmt: skip
    return apply_recipe(base, name="fmhct", explicit={"head_bn"})[0]


def pretrain(args, archive: Path, method: str, epochs: int, *, scan_ids: list[str], monitor_labels: Path) -> dict:
    """Pretrain on ``scan_ids`` (the training and validation patients' scans: the test patients stay unseen),
    with the labelled monitor on the validation part only."""
    from hctembed.workflows.pretrain import pretrain_archive

    run_dir = args.out / f"{method}_run"
    result = pretrain_archive(archive, config=pretrain_config(method, epochs, args), out=run_dir,
                              cache_dir=args.cache, device="cpu", monitor_labels=monitor_labels, resume=True,
                              scan_ids=scan_ids)  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    monitors = [{k: r.get(k) for k in ("step", "loss", "monitor_knn_auc", "monitor_map", "monitor_knn_auc_patches",
                                       "monitor_map_patches", "teacher_entropy", "embedding_std", "pair_top1")}
                for r in rows if "monitor_map" in r]  # fmt: skip
    warnings = sorted({r["warning"] for r in rows if "warning" in r})
    return {"encoder": str(result.encoder_path), "steps": result.steps_done, "scans": len(scan_ids),
            "monitors": monitors, "warnings": warnings}  # fmt: skip


def split_of(args, data):
    """The patient-level 8:1:1 split every stage uses (the probes' and fine-tuning's own)."""
    from hctembed.eval.splits import patient_split

    return patient_split(list(data.patient_ids), ratios=(0.8, 0.1, 0.1), seed=args.seed)


def validation_labels(args, archive: Path, data, split) -> Path:
    """A labels CSV holding the validation part's labels only: what the pretraining monitor may read."""
    import csv

    keep = {data.scan_ids[i] for i in split.val}
    path = args.out / "validation_labels.csv"
    with (archive / "labels.csv").open(newline="") as f_in, path.open("w", newline="") as f_out:
        writer = csv.DictWriter(f_out, fieldnames=["scan_id", *SUBTYPES])
        writer.writeheader()
        for row in csv.DictReader(f_in):
            if row["scan_id"] in keep:
                writer.writerow({k: row[k] for k in ("scan_id", *SUBTYPES)})
    return path


def cached_inputs(args, archive: Path):
    """Scan ids (sorted), patients, labels [N, 5] and cached base paths of every labelled, cached scan."""
    from hctembed.config import VIT_PRESETS
    from hctembed.workflows.finetune import labelled_cache

    size = VIT_PRESETS[args.model].image_size
    return labelled_cache(archive, archive / "labels.csv", tasks=SUBTYPES, image_size=size, cache=args.cache,
                          progress=NO_PROGRESS)  # fmt: skip


@torch.no_grad()
def encode(model, paths, *, image_size: int) -> dict[str, np.ndarray]:
    """The evaluation input of every scan through ``model``: L2-normalised CLS token and mean patch token
    (``[N, D]``) and the patch tokens themselves (``[N, P, D]``, for the attentive probe)."""
    from hctembed.augment import input_from_base
    from hctembed.pretrain.cache import read_base

    model.eval()
    cls, mean, tokens = [], [], []
    for i in range(0, len(paths), 16):
        x = torch.stack([input_from_base(read_base(p), image_size=image_size) for p in paths[i : i + 16]])
        out = model.forward_features(x).float()
        patches = out[:, model.num_prefix_tokens :]
        cls.append(torch.nn.functional.normalize(out[:, 0], dim=-1))
        mean.append(torch.nn.functional.normalize(patches.mean(1), dim=-1))
        tokens.append(patches)
    return {"cls": torch.cat(cls).numpy(), "mean": torch.cat(mean).numpy(), "tokens": torch.cat(tokens).numpy()}


def histogram_features(paths, *, image_size: int) -> np.ndarray:
    """Log counts of 30 intensity bins per window of the model input (a hand-made reference, standardised)."""
    from hctembed.augment import input_from_base
    from hctembed.pretrain.cache import read_base

    rows = []
    for p in paths:
        x = input_from_base(read_base(p), image_size=image_size).numpy()
        rows.append(np.log1p(np.concatenate([np.histogram(x[c], bins=32, range=(0, 1))[0][1:-1] for c in range(3)])))
    h = np.asarray(rows, np.float32)
    return (h - h.mean(0)) / (h.std(0) + 1e-6)


def frozen(args, data, split, encoders: dict[str, Path | None]) -> dict:
    from hctembed.config import VIT_PRESETS
    from hctembed.eval.classification import linear_fit_score
    from hctembed.eval.protocols import Aligned, compare_classification, compare_retrieval
    from hctembed.model.checkpoint import load_encoder_weights
    from hctembed.model.vit3d import ViT3D
    from hctembed.probe.attentive import attentive_fit_score

    names, xs, tokens = [], [], []
    for name, path in encoders.items():
        torch.manual_seed(args.seed)
        model = ViT3D(VIT_PRESETS[args.model]) if path is None else load_encoder_weights(path)[0]
        encoded = encode(model, data.paths, image_size=data.image_size)
        tokens.append(encoded["tokens"])
        for pool in ("cls", "mean"):
            names.append(f"{name}/{pool}")
            xs.append(encoded[pool])
    aligned = Aligned(model_ids=names, x=xs, scan_ids=data.scan_ids, patient_ids=list(data.patient_ids),
                      y=data.y.astype(np.float64), names=list(SUBTYPES), sources=[{} for _ in names])  # fmt: skip
    test = split.test  # retrieval among the held-out patients' scans only (never seen by pretraining)
    held_out = Aligned(model_ids=names, x=[x[test] for x in xs], scan_ids=[data.scan_ids[i] for i in test],
                       patient_ids=[data.patient_ids[i] for i in test], y=data.y[test].astype(np.float64),
                       names=list(SUBTYPES), sources=[{} for _ in names])  # fmt: skip
    retrieval = compare_retrieval(held_out, exclude_same_patient=True, seed=args.seed)
    linear = compare_classification(aligned, method="linear", fit_score=lambda m: linear_fit_score(seed=args.seed),
                                    split=split, seed=args.seed)  # fmt: skip
    hist = Aligned(model_ids=["HU histogram"], x=[histogram_features(data.paths, image_size=data.image_size)],
                   scan_ids=data.scan_ids, patient_ids=list(data.patient_ids), y=data.y.astype(np.float64),
                   names=list(SUBTYPES), sources=[{}])  # fmt: skip
    hist_linear = compare_classification(hist, method="linear", fit_score=lambda m: linear_fit_score(seed=args.seed),
                                         split=split, seed=args.seed)  # fmt: skip
    # the attentive probe on the frozen patch tokens: a learned query can find a focal bleed the pooled vectors dilute
    per_encoder = Aligned(model_ids=list(encoders), x=[x[:, 0] for x in tokens], scan_ids=data.scan_ids,
                          patient_ids=list(data.patient_ids), y=data.y.astype(np.float64), names=list(SUBTYPES),
                          sources=[{} for _ in encoders])  # fmt: skip
    probe = attentive_fit_score(config_kw={"seed": args.seed})
    attentive = compare_classification(per_encoder, method="attentive", features=tokens, split=split,
                                       fit_score=lambda m: probe, seed=args.seed)  # fmt: skip
    return {"retrieval": retrieval, "linear": linear, "attentive": attentive, "histogram_linear": hist_linear}


def embedding_contents(x: np.ndarray, *, patients: list[str], y: np.ndarray, seed: int = 0) -> dict:
    """What varies in embeddings ``x [N, D]``:

    - among the scans of patients with two or more: the share of the variance between patients (1 - pooled
      within-patient variance / total), and the same with the patient ids shuffled among those scans (its level
      when patients do not matter: with about two scans each it is near one half);
    - the share a linear fit on the 0/1 bleed labels ``y [N, 5]`` explains (R², all scans);
    - how often a scan's nearest other scan by cosine of the vectors as they are (as retrieval ranks them) is the
      same patient's, among those scans."""
    ids = np.unique(np.asarray(patients), return_inverse=True)[1]
    counts = np.bincount(ids)
    has_other = counts[ids] > 1

    def between_share(v: np.ndarray, groups: np.ndarray) -> float:
        v = v - v.mean(0)
        means = np.zeros((groups.max() + 1, v.shape[1]))
        np.add.at(means, groups, v)
        within = ((v - (means / np.bincount(groups).clip(1)[:, None])[groups]) ** 2).sum()
        return round(1 - float(within) / float((v**2).sum()), 4)

    grouped = np.unique(ids[has_other], return_inverse=True)[1]
    shuffled = np.random.default_rng(seed).permutation(grouped)
    centred = x - x.mean(0)
    design = np.column_stack([np.ones(len(x)), y.astype(np.float64)])
    residual = centred - design @ np.linalg.lstsq(design, centred, rcond=None)[0]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    nearest = sim.argmax(1)
    return {"between_patient_share": between_share(x[has_other], grouped),
            "between_patient_share_shuffled": between_share(x[has_other], shuffled),
            "bleed_label_r2": round(1 - float((residual**2).sum()) / float((centred**2).sum()), 4),
            "nearest_is_same_patient": round(float((ids[nearest] == ids)[has_other].mean()), 4),
            "scans_with_another": int(has_other.sum())}  # fmt: skip


def contents(args, data, encoders: dict[str, Path | None]) -> dict:
    """:func:`embedding_contents` of every encoder's CLS and mean patch token, and of the HU histogram, on every
    scan (a description of the embeddings: nothing is fitted for a prediction)."""
    from hctembed.config import VIT_PRESETS
    from hctembed.model.checkpoint import load_encoder_weights
    from hctembed.model.vit3d import ViT3D

    out = {}
    for name, path in encoders.items():
        torch.manual_seed(args.seed)
        model = ViT3D(VIT_PRESETS[args.model]) if path is None else load_encoder_weights(path)[0]
        encoded = encode(model, data.paths, image_size=data.image_size)
        for pool in ("cls", "mean"):
            out[f"{name}/{pool}"] = embedding_contents(encoded[pool], patients=list(data.patient_ids), y=data.y)
    hist = histogram_features(data.paths, image_size=data.image_size)
    out["HU histogram"] = embedding_contents(hist, patients=list(data.patient_ids), y=data.y)
    return {"embeddings": out}


def finetune_request(args, archive: Path, encoders: dict[str, Path | None], *, epochs: int, samples: int):
    from hctembed.finetune import FinetuneConfig
    from hctembed.workflows.bench_finetune import FinetuneBenchRequest

    config = FinetuneConfig(model=args.model, epochs=epochs, batch_size=8, samples_per_epoch=samples,
                            lr_backbone=args.ft_lr, lr_head=1e-3, warmup_fraction=0.05, pool=args.pool,
                            seed=args.seed)  # fmt: skip
    return FinetuneBenchRequest(
        archive=archive, labels=archive / "labels.csv", tasks=args.tasks, out_dir=args.out / "finetune",
        weights=tuple(p for p in encoders.values() if p is not None), config=config, cache=args.cache,
    )  # fmt: skip


def estimate(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "–"
    if e.get("low") is None:
        return f"{e['value']:.3f}"
    return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def rows_table(results: dict, metric: str) -> list[str]:
    lines = [f"| row | model | {metric} [95% CI] | P vs {results['models'][0]} |", "|---|---|---|---|"]
    for row in results["rows"]:
        p = row.get("p_values", {}).get(metric)
        lines.append(f"| {row['row']} | {row['model']} | {estimate(row['metrics'].get(metric))} | "
                     f"{'' if p is None else f'{p:.3g}'} |")  # fmt: skip
    return lines


def curves_table(results: dict) -> list[str]:
    lines = [f"| task | model | K | AUC [95% CI] | P vs {results['models'][0]} |", "|---|---|---|---|---|"]
    for curve in results["curves"]:
        for pt in curve["points"]:
            p = (pt.get("p_values") or {}).get("AUC")
            lines.append(f"| {curve['task']} | {curve['model']} | {pt['K']} | {estimate(pt.get('AUC'))} | "
                         f"{'' if p is None else f'{p:.3g}'} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/learning"))
    parser.add_argument("--archive", type=Path, default=None, help="an existing synthetic archive (labels.csv)")
    parser.add_argument("--cache", type=Path, default=None, help="base-volume cache (default OUT/cache)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--model", default="vit-micro")
    parser.add_argument("--tasks", default="IPH,SAH", help="fine-tuning tasks (frozen stages use all five)")
    parser.add_argument("--stages", default="pretrain,frozen,fewshot,finetune")
    parser.add_argument("--mae-lr", type=float, default=3e-4)
    parser.add_argument(
        "--mae-targets",
        choices=("normalised", "raw", "histogram"),
        default="normalised",
        help="MAE loss against per-patch normalised voxels (the MAE paper's), the raw windowed ones, or each patch's "
        "intensity histogram per window",
    )
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="MAE: fraction of patches masked")
    parser.add_argument("--mae-epochs", type=int, default=None, help="default: the budget's (0: no MAE)")
    parser.add_argument("--dino-lr", type=float, default=5e-4)
    parser.add_argument("--simclr-epochs", type=int, default=0, help="SimCLR pretraining epochs (0: none)")
    parser.add_argument("--simclr-lr", type=float, default=5e-4)
    parser.add_argument("--dino-epochs", type=int, default=None)
    parser.add_argument("--dino-recipe", action="store_true", help="DINO with --recipe fmhct and the BN head")
    parser.add_argument("--ks", default=None, help="few-shot K values, comma-separated (default: the budget's)")
    parser.add_argument("--ft-lr", type=float, default=3e-4, help="backbone lr of every fine-tuning (fixed)")
    parser.add_argument("--full-epochs", type=int, default=None, help="epochs of the whole-training-part runs")
    parser.add_argument("--draws", type=int, default=None, help="few-shot draws per K (default: the budget's)")
    parser.add_argument("--pool", default="attentive", help="fine-tuning head's features (cls, mean, attentive)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.tasks = tuple(args.tasks.split(","))
    args.cache = args.cache or args.out / "cache"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    archive = make_archive(args, budget)
    encoders: dict[str, Path | None] = {"random-init": None}
    summary = [f"# Learning on synthetic head CT ({args.model}, budget {args.budget}, archive {archive})", ""]
    data = cached_inputs(args, archive)
    split = split_of(args, data)
    seen = [data.scan_ids[i] for i in (*split.train, *split.val)]
    summary += [f"{len(data.scan_ids)} scans: {len(split.train)} train / {len(split.val)} validation / "
                f"{len(split.test)} test; pretraining sees the first two parts, its monitor the validation "
                "labels only", ""]  # fmt: skip
    if "pretrain" in stages:
        monitor = validation_labels(args, archive, data, split)
        dino_epochs = budget["dino_epochs"] if args.dino_epochs is None else args.dino_epochs
        mae_epochs = budget["mae_epochs"] if args.mae_epochs is None else args.mae_epochs
        for method, epochs in (("mae", mae_epochs), ("dino", dino_epochs), ("simclr", args.simclr_epochs)):
            if epochs:

                def run(m=method, e=epochs):
                    return pretrain(args, archive, m, e, scan_ids=seen, monitor_labels=monitor)

                done = stage(args.out, f"pretrain_{method}", run)
                encoders[method] = Path(done["encoder"])
                summary += [f"## {method} pretraining monitors", "", "```", *(json.dumps(r) for r in
                            done["monitors"]), *done["warnings"], "```", ""]  # fmt: skip
    if "frozen" in stages:
        result = stage(args.out, "frozen", lambda: frozen(args, data, split, encoders))
        summary += ["## Frozen embeddings (held-out patients)", "", "Retrieval mAP, same patient excluded:", "",
                    *rows_table(result["retrieval"], "mAP"), "", "Linear probe, test AUC:", "",
                    *rows_table(result["linear"], "AUC"), "", "Attentive probe on the frozen patch tokens, test AUC:",
                    "", *rows_table(result["attentive"], "AUC"), "", "HU histogram, linear probe:", "",
                    *rows_table(result["histogram_linear"], "AUC"), ""]  # fmt: skip
    if "contents" in stages:
        result = stage(args.out, "contents", lambda: contents(args, data, encoders))
        summary += ["## What the embeddings hold (every scan)", "", "| embedding | variance between patients "
                    "(shuffled ids) | variance explained by the bleed labels | nearest other scan is the same "
                    "patient's |", "|---|---|---|---|", *(f"| {k} | {v['between_patient_share']:.3f} "
                    f"({v['between_patient_share_shuffled']:.3f}) | {v['bleed_label_r2']:.3f} | "
                    f"{v['nearest_is_same_patient']:.3f} |" for k, v in result["embeddings"].items()), ""]  # fmt: skip
    if "fewshot" in stages:
        from hctembed.workflows.bench_finetune import run_fewshot_finetune

        request = finetune_request(args, archive, encoders, epochs=budget["k_epochs"], samples=budget["k_samples"])
        draws = args.draws or budget["draws"]
        ks = tuple(int(k) for k in args.ks.split(",")) if args.ks else budget["ks"]
        name = "fewshot" if args.ks is None else f"fewshot_k{'_'.join(map(str, ks))}"  # one stage per K list
        result = stage(args.out, name, lambda: run_fewshot_finetune(request, ks=ks, draws=draws))
        summary += ["## Fine-tuning at K, scratch first", "", *curves_table(result), ""]
    if "finetune" in stages:
        from hctembed.workflows.bench_finetune import run_bench_finetune

        request = finetune_request(args, archive, encoders, epochs=args.full_epochs or budget["full_epochs"],
                                   samples=budget["full_samples"])  # fmt: skip
        result = stage(args.out, "finetune", lambda: run_bench_finetune(request))
        summary += ["## Fine-tuning on the whole training part, scratch first", "", *rows_table(result, "AUC"), ""]
    (args.out / "summary.md").write_text("\n".join(summary))
    print("\n".join(summary))


if __name__ == "__main__":
    main()
