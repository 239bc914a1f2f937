"""``hctembed probe``: train a probe for one task on stored embeddings, and apply it (scores into DuckDB)."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import (
    BarProgress,
    friendly_errors,
    parse_ratios,
    print_json_lines,
    print_table,
    setup_logging,
    stderr,
)
from hctembed.cli.help_format import PlainGroup

app = typer.Typer(
    help="Train and apply probes on frozen embeddings.", no_args_is_help=True, rich_markup_mode=None, cls=PlainGroup
)


@app.command("train")
@friendly_errors
def train(
    db: Path = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed`."),
    labels: Path | None = typer.Option(
        None, "--labels", help="CSV: scan_id, patient_id, 0/1 label columns (default: the labels stored in the DB)."
    ),
    task: str = typer.Option(..., "--task", help="Label column to predict (e.g. SDH)."),
    out: Path = typer.Option(..., "--out", help="Probe file: .json (linear) or .safetensors (attentive)."),
    kind: str = typer.Option("linear", "--kind", help="linear or attentive."),
    model: str | None = typer.Option(None, "--model", help="Model id (prefix) when the DB holds several."),
    tokens: Path | None = typer.Option(None, "--tokens", help="Precomputed patch tokens (.npz) for attentive."),
    ratios: str = typer.Option("0.8,0.1,0.1", "--ratios", help="Patient-level train,val,test ratios."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split and the training."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs (attentive probe)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Train on the patient-level train split, report test AUC/AP, save the probe and register it in the DB."""
    from hctembed.workflows.probe import ProbeTrainRequest, train_probe

    setup_logging(quiet=quiet)
    request = ProbeTrainRequest(
        db=db, labels=labels, task=task, out=out, kind=kind, model=model, tokens=tokens, ratios=parse_ratios(ratios),
        seed=seed, epochs=epochs,
    )  # fmt: skip
    result = train_probe(request, progress=BarProgress(quiet=quiet))
    stderr.print(f"wrote {out}")
    if as_json:
        print_json_lines([result.row()])
    else:
        print_table([result.row()], title="probe train")


@app.command("apply")
@friendly_errors
def apply(
    probe_file: Path = typer.Argument(..., help="A probe written by `hctembed probe train`."),
    db: Path = typer.Option(..., "--db", help="DuckDB file holding the probe's model's embeddings."),
    tokens: Path | None = typer.Option(None, "--tokens", help="Precomputed patch tokens (.npz) for attentive."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Score every stored scan of the probe's model and write the scores to the DB (probe_scores table)."""
    from hctembed.workflows.probe import apply_probe

    setup_logging(quiet=quiet)
    result = apply_probe(probe_file, db=db, tokens=tokens, progress=BarProgress(quiet=quiet))
    if as_json:
        print_json_lines([result.row()])
    else:
        print_table([result.row()], title="probe apply")
