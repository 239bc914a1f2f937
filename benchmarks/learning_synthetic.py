"""Does pretraining help? The evidence run of issue 12, on a synthetic archive the generator makes.

Stages (each one's results are kept in OUT, so an interrupted run picks up where it stopped):

1. archive: ``hctembed synth`` (or ``--archive`` an existing one with its labels.csv);
2. sanity: the supervised bound: the encoder fine-tuned from scratch on the whole training part per task
   (shows whether the lesions are learnable at the model's input size at all);
3. pretrain: DINO and MAE on the archive's scans (no labels; the kNN/mAP monitor reads labels only to log);
4. frozen: random-init, DINO and MAE encoders embedded into one database; retrieval mAP and linear-probe AUC per
   subtype with bootstrap CIs and paired permutation P values against random init;
5. finetune: scratch against the pretrained initialisations at K = 8, 16, 32 (``--draws`` draws) and on the whole
   training part, with P values against scratch.

Nothing is tuned on the test part: settings are fixed here before the run. Prints one summary table per stage
(pretrained against the random-init / scratch baseline of the same run) and writes OUT/summary.md.

Run (CPU, about 2-3 hours on 2 cores with the defaults; ``--budget quick`` for a 15-minute smoke run):

    .venv/bin/python benchmarks/learning_synthetic.py --out bench-out/learning --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from hctembed.finetune import FinetuneConfig
from hctembed.json_values import json_safe
from hctembed.pretrain import PretrainConfig

log = logging.getLogger("learning_synthetic")

BUDGETS = {
    # scans, matrix, pretrain epochs (MAE, DINO), fine-tune epochs x samples, Ks, draws
    "full": {"n": 800, "matrix": 192, "mae_epochs": 40, "dino_epochs": 20, "ft_epochs": 10, "ft_samples": 400,
             "ks": (8, 16, 32), "draws": 3},
    "quick": {"n": 60, "matrix": 96, "mae_epochs": 2, "dino_epochs": 1, "ft_epochs": 1, "ft_samples": 32,
              "ks": (4,), "draws": 2},
}  # fmt: skip
TASKS = ("EDH", "SDH", "IPH", "IVH", "SAH")


def stage(out: Path, name: str, run):
    """Run ``run()`` once; its JSON result is kept in OUT/<name>.json and reused by later invocations."""
    path = out / f"{name}.json"
    if path.exists():
        log.info("%s: reusing %s", name, path)
        return json.loads(path.read_text())
    start = time.perf_counter()
    result = run()
    result = json_safe(result) | {"seconds": round(time.perf_counter() - start, 1)}
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


def pretrain(args, budget, archive: Path, method: str) -> Path:
    from hctembed.workflows.pretrain import pretrain_archive

    epochs = budget[f"{method}_epochs"]
    config = PretrainConfig(
        method=method, model=args.model, epochs=epochs, batch_size=8, local_crops=4, prototypes=4096,
        lr=args.mae_lr if method == "mae" else args.dino_lr, checkpoint_every=100, monitor_every=100,
        teacher_temp_warmup_epochs=max(1.0, epochs * 0.3), warmup_epochs=max(1.0, epochs * 0.1), seed=args.seed,
    )  # fmt: skip
    result = pretrain_archive(archive, config=config, out=args.out / method, cache_dir=args.out / "cache",
                              device="cpu", monitor_labels=archive / "labels.csv", resume=True)  # fmt: skip
    return result.encoder_path


def frozen(args, archive: Path, weights: dict[str, Path | None]) -> dict:
    from hctembed.workflows.bench import BenchInputs, LinearRequest, RetrievalRequest, run_linear, run_retrieval
    from hctembed.workflows.embed import EmbedRequest, run_embed

    db = args.out / "frozen.duckdb"
    models = []
    for name, path in weights.items():
        summary = run_embed(EmbedRequest(archive=archive, db=db, model=args.model, weights=path, seed=args.seed,
                                         workers=1, batch_size=8))  # fmt: skip
        models.append(summary.model_id)
        log.info("embedded %s as %s", name, summary.model_id)
    inputs = BenchInputs(dbs=(db,), labels=archive / "labels.csv", models=tuple(models), columns=TASKS,
                         seed=args.seed)  # fmt: skip
    retrieval = run_retrieval(RetrievalRequest(inputs, exclude_same_patient=True, compare=True))
    linear = run_linear(LinearRequest(inputs))
    return {"names": dict(zip(models, weights, strict=True)), "retrieval": retrieval, "linear": linear}


def finetune(args, budget, archive: Path, weights: dict[str, Path | None], *, fewshot: bool) -> dict:
    from hctembed.workflows.bench_finetune import FinetuneBenchRequest, run_bench_finetune, run_fewshot_finetune

    config = FinetuneConfig(model=args.model, epochs=budget["ft_epochs"], batch_size=8,
                            samples_per_epoch=budget["ft_samples"], lr_backbone=args.ft_lr, lr_head=1e-3,
                            warmup_fraction=0.05, seed=args.seed)  # fmt: skip
    request = FinetuneBenchRequest(
        archive=archive, labels=archive / "labels.csv", tasks=args.tasks, out_dir=args.out / "finetune",
        weights=tuple(w for w in weights.values() if w is not None), config=config, cache=args.out / "cache",
        n_permutations=1000,
    )  # fmt: skip
    if fewshot:
        return run_fewshot_finetune(request, ks=budget["ks"], draws=budget["draws"])
    return run_bench_finetune(request)


def sanity(args, budget, archive: Path) -> dict:
    from hctembed.workflows.bench_finetune import FinetuneBenchRequest, run_bench_finetune

    config = FinetuneConfig(model=args.model, epochs=budget["ft_epochs"] * 2, batch_size=8,
                            samples_per_epoch=budget["ft_samples"], lr_backbone=args.ft_lr, lr_head=1e-3,
                            warmup_fraction=0.05, seed=args.seed)  # fmt: skip
    request = FinetuneBenchRequest(archive=archive, labels=archive / "labels.csv", tasks=args.tasks,
                                   out_dir=args.out / "sanity", config=config, cache=args.out / "cache")  # fmt: skip
    return run_bench_finetune(request)


def table(results: dict, *, metric: str) -> list[str]:
    """Markdown rows: task, model, value [CI], P against the first model."""
    lines = [f"| task | model | {metric} [95% CI] | P vs {results['models'][0]} |", "|---|---|---|---|"]
    for row in results["rows"]:
        e = row.get("metrics", {}).get(metric) or {}
        p = row.get("p_values", {}).get(metric)
        value = f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" if e.get("value") is not None else "-"
        lines.append(f"| {row['row']} | {row['model']} | {value} | {'' if p is None else f'{p:.3f}'} |")
    return lines


def fewshot_table(results: dict) -> list[str]:
    lines = [f"| task | model | K | AUC [95% CI] | P vs {results['models'][0]} |", "|---|---|---|---|---|"]
    for curve in results["curves"]:
        for pt in curve["points"]:
            e = pt.get("AUC") or {}
            p = (pt.get("p_values") or {}).get("AUC")
            value = f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" if e.get("value") is not None else "-"
            lines.append(f"| {curve['task']} | {curve['model']} | {pt['K']} | {value} | "
                         f"{'' if p is None else f'{p:.3f}'} |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-out/learning"))
    parser.add_argument("--archive", type=Path, default=None, help="an existing synthetic archive (labels.csv)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--model", default="vit-micro")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--stages", default="sanity,pretrain,frozen,fewshot,finetune")
    parser.add_argument("--mae-lr", type=float, default=1.5e-4)
    parser.add_argument("--dino-lr", type=float, default=5e-4)
    parser.add_argument("--ft-lr", type=float, default=1e-4, help="backbone lr of every fine-tuning (fixed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.tasks = tuple(args.tasks.split(","))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    archive = make_archive(args, budget)
    summary = [f"# Learning on synthetic head CT ({args.model}, budget {args.budget})", ""]
    if "sanity" in stages:
        result = stage(args.out, "sanity", lambda: sanity(args, budget, archive))
        summary += [
            "## Supervised bound: fine-tuned from scratch, whole training part",
            "",
            *table(result, metric="AUC"),
            "",
        ]
    weights: dict[str, Path | None] = {"random-init": None}
    if "pretrain" in stages:
        for method in ("mae", "dino"):
            done = stage(
                args.out, f"pretrain_{method}", lambda m=method: {"encoder": pretrain(args, budget, archive, m)}
            )
            weights[method] = Path(done["encoder"])
    if "frozen" in stages:
        result = stage(args.out, "frozen", lambda: frozen(args, archive, weights))
        summary += ["## Frozen embeddings against random init (held-out patients)", "",
                    "Retrieval mAP (same patient excluded):", "", *table(result["retrieval"], metric="mAP"), "",
                    "Linear probe AUC:", "", *table(result["linear"], metric="AUC"), ""]  # fmt: skip
    if "fewshot" in stages:
        result = stage(args.out, "fewshot", lambda: finetune(args, budget, archive, weights, fewshot=True))
        summary += ["## Fine-tuning at K (scratch first)", "", *fewshot_table(result), ""]
    if "finetune" in stages:
        result = stage(args.out, "finetune", lambda: finetune(args, budget, archive, weights, fewshot=False))
        summary += ["## Fine-tuning on the whole training part (scratch first)", "", *table(result, metric="AUC"), ""]
    (args.out / "summary.md").write_text("\n".join(summary))
    print("\n".join(summary))


if __name__ == "__main__":
    main()
