"""``hctembed import-fmhct``: convert the official FM-HCT checkpoint into an hctembed encoder file."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import print_table, setup_logging
from hctembed.errors import InputError


def import_fmhct(
    checkpoint: Path = typer.Argument(
        ..., help="The FM-HCT checkpoint (.pth/.pt read with weights_only, or .safetensors)."
    ),
    out: Path = typer.Option(..., "--out", help="Encoder file to write (.safetensors; a .json goes beside it)."),
    heads: int = typer.Option(12, "--heads", min=1, help="Attention heads (not stored in the tensors; ViT-B: 12)."),
    entry: str | None = typer.Option(
        None,
        "--entry",
        help="teacher (a DINO checkpoint's momentum_model_state_dict: the default), student (its state_dict), or "
        "another entry's name. A flat file or a fine-tuning checkpoint needs none.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Map the FM-HCT key names onto the encoder, load strictly, and save with the 'fmhct-code' preprocessing."""
    from hctembed.model.fmhct import import_fmhct as convert

    setup_logging(quiet=quiet)
    if out.suffix != ".safetensors":
        raise InputError(f"--out must end in .safetensors, got {out.name}")
    digest = convert(checkpoint, out, heads=heads, entry=entry)
    rows = {"encoder": str(out), "weights_digest": digest, "preprocess": "fmhct-code"}
    print_table([{"field": k, "value": v} for k, v in rows.items()], title="import-fmhct")
