"""Issue 30's learning check sized for a lent GPU: one command, under 15 minutes, figures named by the card.

    python benchmarks/gpu_learning.py --out bench-out/gpu-learning        # on a CUDA machine, ~12 min
    python benchmarks/gpu_learning.py --out /tmp/g --budget toy           # CPU smoke run (~1 min), what the tests run

Steps, each timed and written to ``OUT/gpu_learning_<card>.json``:

1. a synthetic head-CT archive (``hctembed synth``, the generator's defaults: five haemorrhage subtypes), generated and
   cached on every CPU core;
2. DINO pretraining of vit-small at 96³ with the paper's recipe (``--recipe fmhct``: inputs standardised per channel,
   lr by the linear rule at the run's batch, teacher 0.04, per-parameter clipping, drop path 0.1) on the training and
   validation patients' scans only. The number of epochs is set from a measured step time so that pretraining takes
   ``--pretrain-share`` of the time left (the schedules then span the run as planned);
3. frozen evaluation on the held-out patients: all-vs-all retrieval mAP (same patient excluded) and a linear probe's
   test AUC per subtype and on their mean, against a random-initialised encoder with the same input handling
   (paired permutation P values);
4. few-shot fine-tuning from scratch against from the pretrained encoder at each K (``--draws`` draws, the tasks fixed
   below), if the budget still allows it;
5. one PNG, ``OUT/gpu_learning_<card>.png``: frozen metrics with CIs and the few-shot curves, titled with the card.

Settings are fixed here before any run; nothing is tuned on the test part.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hctembed.json_values import json_safe

sys.path.insert(0, str(Path(__file__).parent))

log = logging.getLogger("gpu_learning")

SUBTYPES = ("EDH", "SDH", "IPH", "IVH", "SAH")
FEWSHOT_TASKS = ("IPH", "SAH")  # fixed before any run: the two subtypes of the CPU few-shot runs (BENCHMARKS.md)
BUDGETS = {
    # a lent H100/H200: 15 minutes of device time including the machine's start, so ~12 minutes of work
    "gpu": {"n": 600, "matrix": 128, "model": "vit-small", "batch": 32, "seconds": 660.0, "ks": (8, 16, 32),
            "draws": 3, "k_epochs": 10, "k_samples": 64, "probe_steps": 6, "max_epochs": None, "prototypes": None},
    # the CPU smoke run the tests make: the same code at toy size (one epoch, 1,024 prototypes: the recipe's 65,536
    # are most of a toy step's time)
    "toy": {"n": 40, "matrix": 64, "model": "vit-micro", "batch": 4, "seconds": 600.0, "ks": (4,), "draws": 1,
            "k_epochs": 1, "k_samples": 8, "probe_steps": 3, "max_epochs": 1, "prototypes": 1024},
}  # fmt: skip


def card_name(device: str) -> str:
    """The accelerator's name (``torch.cuda.get_device_name``), or ``cpu``."""
    return torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def dino_config(
    *, model: str, batch: int, epochs: int, seed: int, workers: int, prototypes: int | None,
    max_steps: int | None = None,
):  # fmt: skip
    """The paper's DINO recipe (``--recipe fmhct``) for ``model`` at ``batch`` scans a step; ``prototypes`` (given:
    recorded as the user's) replaces the recipe's 65,536."""
    from dataclasses import replace

    from hctembed.pretrain import PretrainConfig
    from hctembed.pretrain.recipes import apply_recipe

    base = PretrainConfig(method="dino", model=model, epochs=epochs, batch_size=batch, max_steps=max_steps,
                          checkpoint_every=10**6, monitor_every=10**6, seed=seed, num_workers=workers,
                          prototypes=prototypes or 65536)  # fmt: skip
    config, sources = apply_recipe(base, name="fmhct", explicit=set() if prototypes is None else {"prototypes"})
    # the lr warm-up is the recipe's 5 epochs; a run of a few epochs keeps it within its first tenth
    warmup = min(config.warmup_epochs, max(epochs * 0.1, 0.5))
    if warmup != config.warmup_epochs:
        sources = {**sources, "warmup_epochs": f"{warmup:g} epochs: a tenth of this short run (recipe: 5)"}
    return replace(config, warmup_epochs=warmup), sources


def card_of(encoder_path: Path) -> dict:
    """The model card written beside the encoder's weights."""
    return json.loads(encoder_path.with_suffix(".json").read_text())["card"]


def seconds_per_step(run_dir: Path) -> float:
    """The step time a run logged, without its first step (start-up, compilation, the first batch's workers)."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "seconds" in r and "step" in r]
    if len(timed) < 3:
        return timed[-1]["seconds"] / max(1, timed[-1]["step"])
    return (timed[-1]["seconds"] - timed[0]["seconds"]) / (timed[-1]["step"] - timed[0]["step"])


@torch.no_grad()
def encode(model, paths, *, image_size: int, device: str) -> np.ndarray:
    """``[N, D]`` L2-normalised CLS vectors of each cached base volume's embedding-time input."""
    from hctembed.augment import input_from_base
    from hctembed.pretrain.cache import read_base

    model = model.to(device).eval()
    out = []
    for i in range(0, len(paths), 32):
        x = torch.stack([input_from_base(read_base(p), image_size=image_size) for p in paths[i : i + 32]])
        cls = model.forward_features(x.to(device)).float()[:, 0]
        out.append(torch.nn.functional.normalize(cls, dim=-1).cpu())
    return torch.cat(out).numpy()


def random_like(encoder, *, seed: int):
    """A random-initialised encoder of ``encoder``'s configuration with its input statistics: the same input
    handling, no learned weights."""
    from hctembed.model.vit3d import ViT3D

    torch.manual_seed(seed)
    model = ViT3D(encoder.config)
    if encoder.config.input_norm == "standardise":
        model.set_input_stats(mean=encoder.input_mean.detach().cpu(), std=encoder.input_std.detach().cpu())
    return model


def frozen(data, split, encoders: dict, *, device: str, seed: int) -> dict:
    from hctembed.eval.classification import linear_fit_score
    from hctembed.eval.protocols import Aligned, compare_classification, compare_retrieval

    names = list(encoders)
    xs = [encode(m, data.paths, image_size=data.image_size, device=device) for m in encoders.values()]
    y = data.y.astype(np.float64)
    test = split.test
    held_out = Aligned(model_ids=names, x=[x[test] for x in xs], scan_ids=[data.scan_ids[i] for i in test],
                       patient_ids=[data.patient_ids[i] for i in test], y=y[test], names=list(SUBTYPES),
                       sources=[{} for _ in names])  # fmt: skip
    everyone = Aligned(model_ids=names, x=xs, scan_ids=data.scan_ids, patient_ids=list(data.patient_ids), y=y,
                       names=list(SUBTYPES), sources=[{} for _ in names])  # fmt: skip
    return json_safe({"retrieval": compare_retrieval(held_out, exclude_same_patient=True, seed=seed),
                      "linear": compare_classification(everyone, method="linear", split=split, seed=seed,
                                                       fit_score=lambda m: linear_fit_score(seed=seed))})  # fmt: skip


def mean_row(result: dict, metric: str) -> dict[str, dict]:
    """Each model's row averaged over the subtypes (the protocol's own ``mean`` row)."""
    rows = {}
    for row in result["rows"]:
        if row["row"] == "mean":
            rows[row["model"]] = {"estimate": row["metrics"].get(metric), "p": row.get("p_values", {}).get(metric)}
    return rows


def draw(path: Path, *, card: str, frozen_result: dict | None, fewshot: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if frozen_result:
        for offset, (key, metric) in enumerate((("retrieval", "mAP"), ("linear", "AUC"))):
            for i, (model, row) in enumerate(mean_row(frozen_result[key], metric).items()):
                e = row["estimate"] or {}
                if e.get("value") is None:
                    continue
                x = offset + (i - 0.5) * 0.35
                err = None
                if e.get("low") is not None:
                    err = [[e["value"] - e["low"]], [e["high"] - e["value"]]]
                axes[0].bar(x, e["value"], width=0.33, yerr=err, color=f"C{i}", label=model if offset == 0 else None)
        axes[0].set_xticks([0, 1], ["retrieval mAP", "linear-probe AUC"])
        axes[0].set_title("frozen, held-out patients (mean of 5 subtypes)")
        axes[0].legend()
    if fewshot:
        for i, curve in enumerate(c for c in fewshot["curves"] if c["task"] == "mean"):
            points = [(pt["K"], (pt.get("AUC") or {}).get("value")) for pt in curve["points"]]
            points = [(k, v) for k, v in points if v is not None]
            if points:
                axes[1].plot(*zip(*points, strict=True), "o-", color=f"C{i}", label=curve["model"])
        axes[1].set_xlabel("K (positives = negatives per task)")
        axes[1].set_ylabel("test AUC")
        axes[1].set_title(f"fine-tuning at K ({', '.join(FEWSHOT_TASKS)})")
        axes[1].legend()
    fig.suptitle(f"hctembed learning check on {card}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="gpu")
    parser.add_argument("--seconds", type=float, default=None, help="time for the whole run (default: the budget's)")
    parser.add_argument("--pretrain-share", type=float, default=0.5, help="share of the time left for pretraining")
    parser.add_argument("--device", default=None, help="default: cuda when torch sees one, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    budget = BUDGETS[args.budget]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    card = card_name(device)
    started = time.perf_counter()
    deadline = started + (args.seconds or budget["seconds"])
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    args.out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    from hctembed.config import VIT_PRESETS
    from hctembed.eval.splits import patient_split
    from hctembed.model.checkpoint import load_encoder_weights
    from hctembed.synth import SynthConfig, generate_archive
    from hctembed.workflows.finetune import labelled_cache
    from hctembed.workflows.pretrain import pretrain_archive
    from hctembed.workflows.progress import NO_PROGRESS

    archive = args.out / "archive"
    t = time.perf_counter()
    if not (archive / "labels.csv").exists():
        generate_archive(archive, n=budget["n"], seed=args.seed, config=SynthConfig(matrix=budget["matrix"]),
                         workers=workers)  # fmt: skip
    size = VIT_PRESETS[budget["model"]].image_size
    data = labelled_cache(archive, archive / "labels.csv", tasks=SUBTYPES, image_size=size, cache=args.out / "cache",
                          progress=NO_PROGRESS)  # fmt: skip
    split = patient_split(list(data.patient_ids), ratios=(0.8, 0.1, 0.1), seed=args.seed)
    seen = [data.scan_ids[i] for i in (*split.train, *split.val)]
    timings["archive_and_cache"] = time.perf_counter() - t

    # the step time, measured on a short run of the same configuration (its own folder; not resumed)
    t = time.perf_counter()
    probe, _ = dino_config(model=budget["model"], batch=budget["batch"], epochs=1, seed=args.seed, workers=workers,
                           prototypes=budget["prototypes"], max_steps=budget["probe_steps"])  # fmt: skip
    pretrain_archive(archive, config=probe, out=args.out / "probe_run", cache_dir=args.out / "cache", device=device,
                     scan_ids=seen)  # fmt: skip
    step_s = seconds_per_step(args.out / "probe_run")
    timings["step_probe"] = time.perf_counter() - t
    steps_per_epoch = max(1, len(seen) // budget["batch"])
    left = deadline - time.perf_counter()
    epochs = max(1, int(left * args.pretrain_share / step_s) // steps_per_epoch)
    epochs = min(epochs, budget["max_epochs"] or epochs)
    config, sources = dino_config(model=budget["model"], batch=budget["batch"], epochs=epochs, seed=args.seed,
                                  workers=workers, prototypes=budget["prototypes"])  # fmt: skip
    log.info("%.3f s a step: %d epochs of %d steps", step_s, epochs, steps_per_epoch)
    t = time.perf_counter()
    result = pretrain_archive(archive, config=config, out=args.out / "dino_run", cache_dir=args.out / "cache",
                              device=device, scan_ids=seen, recipe={"name": "fmhct", "sources": sources})  # fmt: skip
    timings["pretrain"] = time.perf_counter() - t
    encoder = load_encoder_weights(result.encoder_path)[0]

    t = time.perf_counter()
    encoders = {"random init": random_like(encoder, seed=args.seed), "DINO (fmhct)": encoder}
    frozen_result = frozen(data, split, encoders, device=device, seed=args.seed)
    timings["frozen"] = time.perf_counter() - t

    fewshot = None
    if time.perf_counter() < deadline:
        from hctembed.finetune import FinetuneConfig
        from hctembed.workflows.bench_finetune import FinetuneBenchRequest, run_fewshot_finetune

        t = time.perf_counter()
        ft = FinetuneConfig(model=budget["model"], epochs=budget["k_epochs"], batch_size=8, seed=args.seed,
                            samples_per_epoch=budget["k_samples"], lr_backbone=3e-4, lr_head=1e-3,
                            warmup_fraction=0.05, pool="attentive")  # fmt: skip
        request = FinetuneBenchRequest(archive=archive, labels=archive / "labels.csv", tasks=FEWSHOT_TASKS,
                                       out_dir=args.out / "finetune", weights=(result.encoder_path,), config=ft,
                                       cache=args.out / "cache", device=device)  # fmt: skip
        fewshot = json_safe(run_fewshot_finetune(request, ks=budget["ks"], draws=budget["draws"]))
        timings["fewshot"] = time.perf_counter() - t
    else:
        log.warning("few-shot fine-tuning skipped: the %s s budget is spent", args.seconds or budget["seconds"])

    name = f"gpu_learning_{slug(card)}"
    summary = json_safe({
        "card": card, "device": device, "budget": args.budget, "model": budget["model"], "scans": len(data.scan_ids),
        "split": {"train": len(split.train), "validation": len(split.val), "test": len(split.test)},
        "pretraining": {"seconds_per_step": step_s, "epochs": epochs, "steps": result.steps_done,
                        "batch": budget["batch"], "peak_lr": card_of(result.encoder_path).get("peak_lr"),
                        "last": result.last, "recipe_sources": sources},
        "frozen": {"retrieval_map": mean_row(frozen_result["retrieval"], "mAP"),
                   "linear_auc": mean_row(frozen_result["linear"], "AUC"), "full": frozen_result},
        "fewshot": fewshot, "seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    })  # fmt: skip
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    draw(args.out / f"{name}.png", card=card, frozen_result=frozen_result, fewshot=fewshot)
    for what, rows in (("retrieval mAP", summary["frozen"]["retrieval_map"]),
                       ("linear AUC", summary["frozen"]["linear_auc"])):  # fmt: skip
        for model, row in rows.items():
            e = row["estimate"] or {}
            print(json.dumps({"card": card, "metric": what, "model": model, "value": e.get("value"),
                              "low": e.get("low"), "high": e.get("high"), "p_vs_random": row["p"]}))  # fmt: skip
    print(json.dumps({"card": card, "seconds": summary["seconds"], "total_seconds": summary["total_seconds"]}))
    return summary


if __name__ == "__main__":
    main()
