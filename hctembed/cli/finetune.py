"""``hctembed finetune``: full fine-tuning of an encoder and a classification layer (see
:mod:`hctembed.workflows.finetune`)."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import (
    ARCHITECTURES,
    BarProgress,
    parse_ratios,
    print_json_lines,
    print_table,
    setup_logging,
    stderr,
)


def finetune_config(*, model, epochs, max_steps, batch_size, lr_backbone, lr_head, samples_per_epoch, seed,
                    workers=0, checkpoint_every=50, pool="cls", warmup_fraction=0.0):  # fmt: skip
    from hctembed.finetune import FinetuneConfig

    return FinetuneConfig(
        model=model, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr_backbone=lr_backbone,
        lr_head=lr_head, samples_per_epoch=samples_per_epoch, seed=seed, num_workers=workers,
        checkpoint_every=checkpoint_every, pool=pool, warmup_fraction=warmup_fraction,
    )  # fmt: skip


WARMUP = typer.Option(
    0.0, "--warmup-fraction", min=0.0, max=0.5, help="Linear warm-up over this fraction of the steps, then cosine."
)


def result_rows(results: dict) -> list[dict]:
    """One flat row per task: AUC and AP with their CIs, or why they are missing."""
    rows = []
    for r in results["rows"]:
        row = {"task": r["task"], "n_train": r["n_train"], "n_test": r.get("n_test"),
               "positives": r.get("n_test_positive")}  # fmt: skip
        for m in ("AUC", "AP"):
            e = r.get(m) or {}
            row |= {m: e.get("value"), f"{m}_low": e.get("low"), f"{m}_high": e.get("high")}
        rows.append(row | {"note": r.get("skip_reason") or ""})
    return rows


def finetune(
    archive: Path = typer.Argument(..., help="Archive folder / file, or a manifest.parquet from `hctembed scan`."),
    labels: Path = typer.Option(..., "--labels", help="CSV with scan_id, patient_id and 0/1 label columns."),
    task: list[str] = typer.Option(..., "--task", help="Label column to learn (repeat for several)."),
    out: Path = typer.Option(..., "--out", help="Run folder: results.json, encoder, head, log, checkpoints."),
    model: str = typer.Option(
        "vit-base",
        "--model",
        help=f"Architecture for --scratch ({ARCHITECTURES}); a weight file names its own.",
    ),
    weights: Path | None = typer.Option(None, "--weights", help="Encoder to start from (safetensors)."),
    scratch: bool = typer.Option(False, "--scratch", help="Start from random weights instead of --weights."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Planned epochs (the cosine schedule spans these)."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after this many steps."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Scans per optimiser step."),
    lr_backbone: float = typer.Option(1e-5, "--lr-backbone", help="Peak learning rate of the encoder."),
    lr_head: float = typer.Option(1e-3, "--lr-head", help="Peak learning rate of the classification layer."),
    warmup_fraction: float = WARMUP,
    samples_per_epoch: int | None = typer.Option(
        None, "--samples-per-epoch", min=2, help="Balanced sample per epoch (default 5,000; 500 under 5,000 scans)."
    ),
    k_shot: int | None = typer.Option(None, "--k-shot", min=1, help="Train on K positives + K negatives per task."),
    pool: str = typer.Option(
        "cls", "--pool", help="Features for the head: cls (as embed stores), mean patch, or attentive (learned query)."
    ),
    joint: bool = typer.Option(False, "--joint", help="One encoder with a head per task (default: one per task)."),
    ratios: str = typer.Option("0.8,0.1,0.1", "--ratios", help="Patient-level train,val,test ratios."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, sampling, augmentation and initialisation."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the run folder's checkpoints (exactly)."),
    cache: Path | None = typer.Option(None, "--cache", help="Preprocessed-volume cache (default OUT/cache)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines, one per task."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Fine-tune an encoder plus a classification layer per task; test AUC/AP with 95% CIs (FM-HCT Methods)."""
    from hctembed.workflows.finetune import FinetuneRequest, run_finetune

    setup_logging(quiet=quiet)
    if (weights is None) == (not scratch):
        raise typer.BadParameter("give --weights FILE or --scratch (one of them)")
    config = finetune_config(
        model=model, epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr_backbone=lr_backbone,
        lr_head=lr_head, samples_per_epoch=samples_per_epoch, seed=seed, pool=pool, warmup_fraction=warmup_fraction,
    )  # fmt: skip
    request = FinetuneRequest(
        archive=archive, labels=labels, tasks=tuple(task), out=out, weights=weights, config=config, k_shot=k_shot,
        ratios=parse_ratios(ratios), joint=joint, cache=cache, resume=resume, device=device,
    )  # fmt: skip
    results = run_finetune(request, progress=BarProgress(quiet=quiet))
    if results is None:  # another rank of a torchrun job: rank 0 reports
        return
    stderr.print(f"wrote {out / 'results.json'}")
    rows = result_rows(results)
    if as_json:
        print_json_lines(rows)
    else:
        print_table(rows, title=f"finetune from {results['init']}, {results['n_scans']} scans")
