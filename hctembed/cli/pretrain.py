"""``hctembed pretrain``: self-supervised pretraining (DINO, MAE or SimCLR) of the 3D ViT on an archive.

Single process: ``hctembed pretrain ARCHIVE --method dino --config vit-small --out runs/dino``.
Several GPUs or nodes: ``torchrun --nproc-per-node 4 -m hctembed.cli pretrain ...`` (DDP; nccl on GPU,
gloo on CPU). Leaves ``OUT/encoder.safetensors`` (+ ``.json`` with the model card) for
``hctembed embed --weights``, ``OUT/checkpoint.pt`` for ``--resume`` and ``OUT/log.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import parse_numbers, print_table, setup_logging

# CLI parameter -> the PretrainConfig field it sets (for --recipe: options given explicitly win)
_FIELDS = {
    "method": "method", "config": "model", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
    "local_crops": "local_crops", "prototypes": "prototypes", "head_bn": "head_bn",
    "intensity_jitter": "intensity_jitter", "centering": "centering", "koleo": "koleo", "temperature": "temperature",
    "norm_pix_loss": "mae.norm_pix_loss", "mae_target": "mae.target", "mask_ratio": "mae.mask_ratio",
    "input_norm": "input_norm", "clip_mode": "clip_mode", "drop_path": "drop_path",
    "pair_intensity_jitter": "pair_intensity_jitter", "pair_crop_mm": "pair_crop_mm",
}  # fmt: skip


def pretrain(
    ctx: typer.Context,
    archive: Path = typer.Argument(..., help="Archive folder / file, or a manifest.parquet from `hctembed scan`."),
    method: str = typer.Option("dino", "--method", help="dino, mae or simclr (contrastive pairs of whole heads)."),
    config: str = typer.Option("vit-base", "--config", help="vit-base, vit-small, vit-tiny or vit-micro."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoint, log.jsonl, encoder.safetensors."),
    epochs: int = typer.Option(100, "--epochs", min=1, help="Planned epochs (the schedules span these)."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimiser steps."),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Scans per process and micro-batch."),
    accumulate: int = typer.Option(1, "--accumulate", min=1, help="Micro-batches per optimiser step."),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=1, help="Steps between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt (exactly)."),
    local_crops: int = typer.Option(3, "--local-crops", min=0, help="DINO local crops per scan."),
    prototypes: int = typer.Option(65536, "--prototypes", min=2, help="DINO head output dimension."),
    head_bn: bool = typer.Option(
        False, "--head-bn/--no-head-bn", help="DINO head with BatchNorm before each GELU (DINO's use_bn_in_head)."
    ),
    intensity_jitter: bool = typer.Option(
        True, "--intensity-jitter/--no-intensity-jitter", help="DINO views get the paper's intensity shift/contrast."
    ),
    pair_intensity_jitter: bool = typer.Option(
        False,
        "--pair-intensity-jitter/--no-pair-intensity-jitter",
        help="SimCLR: each view gets its own intensity shift/contrast (DINO's ranges), so views cannot be matched "
        "by CT number alone.",
    ),
    pair_crop_mm: str | None = typer.Option(
        None,
        "--pair-crop-mm",
        help="SimCLR: LO,HI - each view its own random cube of LO-HI mm (of the 224 mm base) before its deformation "
        "(akin to SimCLR's random resized crop). Default: both views deform the whole head.",
    ),
    centering: str = typer.Option(
        "ema", "--centering", help="DINO teacher targets: ema (DINO's running centre) or sinkhorn (DINOv2's)."
    ),
    koleo: float = typer.Option(
        0.0, "--koleo", min=0.0, help="DINO: weight of DINOv2's KoLeo term spreading the batch's CLS vectors."
    ),
    norm_pix_loss: bool = typer.Option(
        False, "--norm-pix-loss/--no-norm-pix-loss", help="MAE: per-patch normalised targets (the MAE paper's best)."
    ),
    temperature: float = typer.Option(0.1, "--temperature", min=1e-3, help="SimCLR: the NT-Xent temperature."),
    mae_target: str = typer.Option(
        "pixels",
        "--mae-target",
        help="MAE: predict each masked patch's voxels (pixels) or intensity histogram "
        "per window (histogram: the patch's tissue make-up rather than its edges).",
    ),
    mask_ratio: float = typer.Option(0.75, "--mask-ratio", min=0.01, max=0.99, help="MAE: fraction of patches masked."),
    scans: Path | None = typer.Option(
        None, "--scans", help="Text file of scan ids (one per line): pretrain on these only, e.g. a training part."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: base lr x batch / 256)."),
    recipe: str | None = typer.Option(
        None,
        "--recipe",
        help="fmhct: the paper's settings (DINO/MAE code defaults where it is silent), lr by the "
        "linear rule; options given explicitly win. The card lists each value's source.",
    ),
    input_norm: str = typer.Option(
        "none",
        "--input-norm",
        help="none, or standardise: per-channel statistics of the training scans, saved "
        "with the weights and applied by every later use of the encoder.",
    ),
    clip_mode: str = typer.Option(
        "global", "--clip-mode", help="Gradient clipping at 3.0: global (all together) or per-parameter (DINO's)."
    ),
    drop_path: float = typer.Option(0.0, "--drop-path", min=0.0, max=0.99, help="Stochastic depth rate (last block)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation, crops and sampling."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader workers cutting views."),
    cache: Path | None = typer.Option(None, "--cache", help="Preprocessed-volume cache (default OUT/cache)."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    monitor_labels: Path | None = typer.Option(
        None, "--monitor-labels", help="labels CSV: log kNN AUC and retrieval mAP on labelled scans every N steps."
    ),
    monitor_every: int = typer.Option(50, "--monitor-every", min=1, help="Steps between labelled monitors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Pretrain the encoder with DINO, MAE or SimCLR and export it for `hctembed embed --weights`."""
    from hctembed.pretrain import PretrainConfig
    from hctembed.workflows.pretrain import pretrain_archive

    setup_logging(quiet=quiet)
    run = PretrainConfig(
        method=method,
        model=config,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        accumulate=accumulate,
        lr=lr,
        checkpoint_every=checkpoint_every,
        local_crops=local_crops,
        prototypes=prototypes,
        head_bn=head_bn,
        intensity_jitter=intensity_jitter,
        pair_intensity_jitter=pair_intensity_jitter,
        pair_crop_mm=_mm_range(pair_crop_mm),
        centering=centering,
        koleo=koleo,
        temperature=temperature,
        mae=mae_settings(norm_pix_loss=norm_pix_loss, target=mae_target, mask_ratio=mask_ratio),
        seed=seed,
        num_workers=workers,
        monitor_every=monitor_every,
        input_norm=input_norm,
        clip_mode=clip_mode,
        drop_path=drop_path,
    )
    sources = None
    if recipe is not None:
        from hctembed.pretrain.recipes import apply_recipe

        # by name: typer vendors its own click, whose ParameterSource is not click's
        given = {param for param in _FIELDS if getattr(ctx.get_parameter_source(param), "name", "DEFAULT") not in
                 ("DEFAULT", "DEFAULT_MAP")}  # fmt: skip
        explicit = {_FIELDS[param] for param in given}
        run, sources = apply_recipe(run, name=recipe, explicit=explicit)
    result = pretrain_archive(
        archive, config=run, out=out, resume=resume, cache_dir=cache, device=device, monitor_labels=monitor_labels,
        scan_ids=_scan_list(scans), recipe=None if recipe is None else {"name": recipe, "sources": sources},
    )  # fmt: skip
    if result is not None:  # rank 0
        rows = {
            "out": str(out),
            "encoder": str(result.encoder_path),
            "scans": result.data_count,
            "failed": len(result.failed),
            "steps": f"{result.steps_done}/{result.total_steps}",
            "loss": result.last.get("loss"),
        }
        print_table([{"field": k, "value": v} for k, v in rows.items()], title="pretrain")


def mae_settings(*, norm_pix_loss: bool, target: str, mask_ratio: float):
    """The MAE options as a config; an inconsistent pair is a usage error naming the options."""
    from hctembed.pretrain.mae import MAE_TARGETS, MAEConfig

    if target not in MAE_TARGETS:
        raise typer.BadParameter(f"--mae-target {target!r}: use {' or '.join(MAE_TARGETS)}")
    if norm_pix_loss and target != "pixels":
        raise typer.BadParameter("--norm-pix-loss applies to --mae-target pixels only")
    return MAEConfig(norm_pix_loss=norm_pix_loss, target=target, mask_ratio=mask_ratio)


def _scan_list(path: Path | None) -> list[str] | None:
    """The scan ids of a ``--scans`` file, one per line (None: every scan of the archive)."""
    if path is None:
        return None
    if not path.is_file():
        raise typer.BadParameter(f"--scans {path}: no such file")
    scan_ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not scan_ids:
        raise typer.BadParameter(f"--scans {path} lists no scan ids (one per line)")
    return scan_ids


def _mm_range(text: str | None) -> tuple[float, float] | None:
    """``--pair-crop-mm`` ``"LO,HI"`` -> ``(LO, HI)`` in mm (None stays None)."""
    if text is None:
        return None
    return parse_numbers(text, option="--pair-crop-mm", names=("LO", "HI"))  # type: ignore[return-value]
