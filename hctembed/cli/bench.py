"""``hctembed bench``: evaluation protocols over stored embeddings (see :mod:`hctembed.workflows.bench`)."""

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
from hctembed.cli.finetune import WARMUP  # the same option as `hctembed finetune --warmup-fraction`
from hctembed.cli.help_format import PlainGroup

app = typer.Typer(
    help="Benchmarks over stored embeddings.", no_args_is_help=True, rich_markup_mode=None, cls=PlainGroup
)

DB = typer.Option(..., "--db", help="DuckDB file (repeatable: one model per file).")
LABELS = typer.Option(
    None, "--labels", help="CSV: scan_id, patient_id, 0/1 label columns (default: the labels stored in the database)."
)
ARCHIVE_LABELS = typer.Option(
    None, "--labels", help="CSV: scan_id, patient_id, 0/1 label columns (default: ARCHIVE/labels.csv)."
)
MODEL = typer.Option(None, "--model", help="Model id (prefix); repeat to compare models in one DB.")
COLUMNS = typer.Option(None, "--columns", help="Comma-separated label columns (default: all 0/1).")
OUT_DIR = typer.Option(None, "--out-dir", help="Write results.json, results.md and PNG plots here.")
RATIOS = typer.Option("0.8,0.1,0.1", "--ratios", help="Patient-level train,val,test ratios.")
SEED = typer.Option(0, "--seed", help="Seed of the split, sampling, bootstrap and permutations.")
RESAMPLES = typer.Option(100, "--n-resamples", min=1, help="Bootstrap resamples for 95% CIs.")
PERMUTATIONS = typer.Option(1000, "--n-permutations", min=1, help="Permutations of the paired test.")
JSON = typer.Option(False, "--json", help="JSON lines, one per row and model.")
QUIET = typer.Option(False, "--quiet", "-q", help="Warnings and errors only.")
ARCHIVE = typer.Option(None, "--archive", help="Archive to fine-tune on (folder, file or manifest.parquet).")
WEIGHTS = typer.Option(None, "--weights", help="Encoder to fine-tune from (repeatable; compared with scratch).")
NO_SCRATCH = typer.Option(False, "--no-scratch", help="Leave the from-scratch model out.")
ARCH = typer.Option("vit-base", "--arch", help="Architecture of the from-scratch model.")
EPOCHS = typer.Option(10, "--epochs", min=1, help="Fine-tuning epochs.")
BATCH = typer.Option(8, "--batch-size", min=1, help="Scans per fine-tuning step.")
LR_BACKBONE = typer.Option(1e-5, "--lr-backbone", help="Peak learning rate of the encoder.")
LR_HEAD = typer.Option(1e-3, "--lr-head", help="Peak learning rate of the classification layer.")
POOL = typer.Option("cls", "--pool", help="Fine-tuning head's features: cls, mean or attentive (learned query).")
SAMPLES = typer.Option(None, "--samples-per-epoch", min=2, help="Balanced sample per epoch (default 5,000 / 500).")


def _inputs(db, labels, model, columns, *, ratios="0.8,0.1,0.1", seed=0, n_resamples=100, n_permutations=1000):
    from hctembed.workflows.bench import BenchInputs

    return BenchInputs(
        dbs=tuple(db),
        labels=labels,
        models=tuple(model or ()),
        columns=tuple(columns.split(",")) if columns else None,
        ratios=parse_ratios(ratios),
        seed=seed,
        n_resamples=n_resamples,
        n_permutations=n_permutations,
    )


def show_results(results, *, out_dir: Path | None, out: Path | None = None, as_json: bool) -> None:
    """Write the report files, then print the results as JSON lines or a table."""
    from hctembed.eval.report import flat_rows
    from hctembed.workflows.bench import SingleRetrieval, write_results

    for path in write_results(results, out_dir=out_dir, out=out):
        stderr.print(f"wrote {path}")
    if isinstance(results, SingleRetrieval):
        rows = results.rows()
        title = f"retrieval, {results.model_id}, {results.report.n_scans} scans" + (
            ", same patient excluded" if results.exclude_same_patient else ""
        )
        drop = "model_id"
    else:
        rows = [{"protocol": results.protocol, **r} for r in flat_rows(results)]
        title = f"{results.protocol}, {len(results.models)} model(s), {results.n_scans} scans"
        drop = "protocol"
    if as_json:
        print_json_lines(rows)
        return
    notes = {}  # printed under the table, not as a wide column that is mostly empty
    for r in rows:
        note, reason = r.pop("note", None), r.pop("skip_reason", None)
        if note or reason:
            notes[" ".join(str(r[k]) for k in ("label", "row", "task", "model", "K") if k in r)] = note or reason
    print_table([{k: v for k, v in r.items() if k != drop} for r in rows], title=title)
    for name, note in notes.items():
        stderr.print(f"{name}: {note}")


@app.command("retrieval")
@friendly_errors
def retrieval(
    db: list[Path] = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed` (repeatable)."),
    labels: Path | None = LABELS,
    model: list[str] | None = typer.Option(
        None, "--model", help="Model id (prefix) when the DB holds several; repeat to compare models."
    ),
    columns: str | None = COLUMNS,
    exclude_same_patient: bool = typer.Option(
        False, "--exclude-same-patient", help="Leave the query patient's other scans out of its gallery."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the full results (per-query AP too) as JSON."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines (one per label and a mean row)."),
    out_dir: Path | None = typer.Option(
        None, "--out-dir", help="Write results.json, results.md and PNG plots (CIs, P values) here."
    ),
    n_resamples: int = RESAMPLES,
    n_permutations: int = PERMUTATIONS,
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and permutation test."),
    quiet: bool = QUIET,
) -> None:
    """All-vs-all retrieval per label (FM-HCT Methods): mAP and P@1/5/10 per subtype and their mean.

    With several models (or --out-dir): bootstrap CIs over queries, paired permutation P values against the
    first model, and results.json, results.md and plots in --out-dir."""
    from hctembed.workflows.bench import RetrievalRequest, run_retrieval

    setup_logging(quiet=quiet)
    inputs = _inputs(db, labels, model, columns, seed=seed, n_resamples=n_resamples, n_permutations=n_permutations)
    request = RetrievalRequest(inputs, exclude_same_patient=exclude_same_patient, compare=out_dir is not None)
    show_results(run_retrieval(request), out_dir=out_dir, out=out, as_json=as_json)


@app.command("knn")
@friendly_errors
def knn(
    db: list[Path] = DB,
    labels: Path | None = LABELS,
    model: list[str] | None = MODEL,
    columns: str | None = COLUMNS,
    k: int = typer.Option(20, "--k", min=1, help="Neighbours."),
    temperature: float = typer.Option(0.07, "--temperature", help="Vote weight exp(sim / T) (DINO)."),
    uniform: bool = typer.Option(False, "--uniform", help="Equal vote weights instead of exp(sim / T)."),
    out_dir: Path | None = OUT_DIR,
    ratios: str = RATIOS,
    seed: int = SEED,
    n_resamples: int = RESAMPLES,
    n_permutations: int = PERMUTATIONS,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """kNN baseline per label: cosine, k nearest training scans, temperature-weighted vote; AUC and AP."""
    from hctembed.workflows.bench import KnnRequest, run_knn

    setup_logging(quiet=quiet)
    inputs = _inputs(db, labels, model, columns, ratios=ratios, seed=seed, n_resamples=n_resamples,
                     n_permutations=n_permutations)  # fmt: skip
    results = run_knn(KnnRequest(inputs, k=k, temperature=temperature, uniform=uniform))
    show_results(results, out_dir=out_dir, as_json=as_json)


@app.command("linear")
@friendly_errors
def linear(
    db: list[Path] = DB,
    labels: Path | None = LABELS,
    model: list[str] | None = MODEL,
    columns: str | None = COLUMNS,
    c: float = typer.Option(1.0, "--C", help="Inverse L2 strength of the logistic regression."),
    out_dir: Path | None = OUT_DIR,
    ratios: str = RATIOS,
    seed: int = SEED,
    n_resamples: int = RESAMPLES,
    n_permutations: int = PERMUTATIONS,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Linear probe per label: logistic regression (classes balanced) on frozen embeddings; AUC and AP."""
    from hctembed.workflows.bench import LinearRequest, run_linear

    setup_logging(quiet=quiet)
    inputs = _inputs(db, labels, model, columns, ratios=ratios, seed=seed, n_resamples=n_resamples,
                     n_permutations=n_permutations)  # fmt: skip
    show_results(run_linear(LinearRequest(inputs, C=c)), out_dir=out_dir, as_json=as_json)


@app.command("attentive")
@friendly_errors
def attentive(
    db: list[Path] = DB,
    labels: Path | None = LABELS,
    model: list[str] | None = MODEL,
    columns: str | None = COLUMNS,
    tokens: list[Path] | None = typer.Option(
        None,
        "--tokens",
        help="Precomputed patch tokens (.npz: scan_ids, tokens), one per model in order; "
        "default: recomputed from the scan files with the stored encoder.",
    ),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs of the attentive probe."),
    samples_per_epoch: int = typer.Option(500, "--samples-per-epoch", min=2, help="Balanced sample per epoch."),
    heads: int = typer.Option(4, "--heads", min=1, help="Attention heads of the attentive probe."),
    out_dir: Path | None = OUT_DIR,
    ratios: str = RATIOS,
    seed: int = SEED,
    n_resamples: int = RESAMPLES,
    n_permutations: int = PERMUTATIONS,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Attentive probe per label: a learned query over the encoder's patch tokens (torch); AUC and AP."""
    from hctembed.workflows.bench import AttentiveRequest, run_attentive

    setup_logging(quiet=quiet)
    inputs = _inputs(db, labels, model, columns, ratios=ratios, seed=seed, n_resamples=n_resamples,
                     n_permutations=n_permutations)  # fmt: skip
    request = AttentiveRequest(
        inputs, tokens=tuple(tokens or ()), epochs=epochs, samples_per_epoch=samples_per_epoch, heads=heads
    )
    show_results(run_attentive(request, progress=BarProgress(quiet=quiet)), out_dir=out_dir, as_json=as_json)


@app.command("fewshot")
@friendly_errors
def fewshot(
    db: list[Path] | None = typer.Option(None, "--db", help="DuckDB file (repeatable); not with --finetune."),
    labels: Path | None = LABELS,
    model: list[str] | None = MODEL,
    columns: str | None = COLUMNS,
    ks: str = typer.Option("8,16,32,64,128,256", "--ks", help="K positives and K negatives per task."),
    draws: int = typer.Option(5, "--draws", min=1, help="Random training draws per K."),
    probe: str = typer.Option("linear", "--probe", help="linear or knn, trained on the K + K scans."),
    out_dir: Path | None = OUT_DIR,
    ratios: str = RATIOS,
    seed: int = SEED,
    n_resamples: int = RESAMPLES,
    finetune: bool = typer.Option(
        False, "--finetune", help="Fine-tune the encoder at each K (as the paper) instead of a probe on vectors."
    ),
    archive: Path | None = ARCHIVE,
    weights: list[Path] | None = WEIGHTS,
    no_scratch: bool = NO_SCRATCH,
    arch: str = ARCH,
    epochs: int = EPOCHS,
    batch_size: int = BATCH,
    lr_backbone: float = LR_BACKBONE,
    lr_head: float = LR_HEAD,
    warmup_fraction: float = WARMUP,
    samples_per_epoch: int | None = SAMPLES,
    pool: str = POOL,
    n_permutations: int = PERMUTATIONS,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Few-shot curves: K positives + K negatives per task, several draws; AUC and AP on the test split.

    Default: a probe on stored vectors (--db). With --finetune: the encoder fine-tuned at each K from scratch and
    from each --weights file on --archive's cached scans, as in FM-HCT Fig. 2, with P values against the first."""
    from hctembed.workflows.bench import FewshotRequest, run_fewshot

    setup_logging(quiet=quiet)
    try:
        k_values = tuple(int(k) for k in ks.split(","))
    except ValueError:
        raise typer.BadParameter(f"--ks needs whole numbers separated by commas, got {ks!r}") from None
    if finetune:
        from hctembed.workflows.bench_finetune import run_fewshot_finetune

        request = _finetune_request(
            archive=archive, labels=labels, columns=columns, out_dir=out_dir, weights=weights, no_scratch=no_scratch,
            arch=arch, epochs=epochs, batch_size=batch_size, lr_backbone=lr_backbone, lr_head=lr_head,
            warmup_fraction=warmup_fraction,
            samples_per_epoch=samples_per_epoch, pool=pool, ratios=ratios, seed=seed, n_resamples=n_resamples,
            n_permutations=n_permutations,
        )  # fmt: skip
        results = run_fewshot_finetune(request, ks=k_values, draws=draws, progress=BarProgress(quiet=quiet))
        show_results(results, out_dir=out_dir, as_json=as_json)
        return
    if not db:
        raise typer.BadParameter("give --db (probes on stored vectors) or --finetune --archive")
    inputs = _inputs(db, labels, model, columns, ratios=ratios, seed=seed, n_resamples=n_resamples,
                     n_permutations=n_permutations)  # fmt: skip
    request = FewshotRequest(inputs, ks=k_values, draws=draws, probe=probe)
    show_results(run_fewshot(request), out_dir=out_dir, as_json=as_json)


def _finetune_request(*, archive, labels, columns, out_dir, weights, no_scratch, arch, epochs, batch_size,
                      lr_backbone, lr_head, samples_per_epoch, pool, ratios, seed, n_resamples,
                      n_permutations, warmup_fraction=0.0):  # fmt: skip
    from hctembed.cli.finetune import finetune_config
    from hctembed.io.labels import read_labels
    from hctembed.workflows.bench_finetune import FinetuneBenchRequest

    if archive is None or out_dir is None:
        raise typer.BadParameter("fine-tuning needs --archive (the scans) and --out-dir (cache and results)")
    if labels is None and (archive / "labels.csv").is_file():
        labels = archive / "labels.csv"
    if labels is None:
        raise typer.BadParameter(f"fine-tuning needs --labels CSV ({archive / 'labels.csv'} does not exist)")
    tasks = tuple(columns.split(",")) if columns else tuple(read_labels(labels).names)
    config = finetune_config(
        model=arch, epochs=epochs, max_steps=None, batch_size=batch_size, lr_backbone=lr_backbone, lr_head=lr_head,
        samples_per_epoch=samples_per_epoch, seed=seed, pool=pool, warmup_fraction=warmup_fraction,
    )  # fmt: skip
    return FinetuneBenchRequest(
        archive=archive, labels=labels, tasks=tasks, out_dir=out_dir, weights=tuple(weights or ()),
        scratch=not no_scratch, config=config, ratios=parse_ratios(ratios), n_resamples=n_resamples,
        n_permutations=n_permutations,
    )  # fmt: skip


@app.command("finetune")
@friendly_errors
def finetune(
    archive: Path = typer.Option(..., "--archive", help="Archive folder / file, or a manifest.parquet."),
    labels: Path | None = ARCHIVE_LABELS,
    columns: str | None = typer.Option(None, "--columns", help="Comma-separated tasks (default: all 0/1)."),
    weights: list[Path] | None = WEIGHTS,
    no_scratch: bool = NO_SCRATCH,
    arch: str = ARCH,
    epochs: int = EPOCHS,
    batch_size: int = BATCH,
    lr_backbone: float = LR_BACKBONE,
    lr_head: float = LR_HEAD,
    warmup_fraction: float = WARMUP,
    samples_per_epoch: int | None = SAMPLES,
    pool: str = POOL,
    out_dir: Path = typer.Option(..., "--out-dir", help="Cache, results.json, results.md and PNG plots."),
    ratios: str = RATIOS,
    seed: int = SEED,
    n_resamples: int = RESAMPLES,
    n_permutations: int = PERMUTATIONS,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Fine-tuning from scratch against from weight files, per task, on one split (FM-HCT Fig. 1): AUC and AP
    with 95% CIs and paired permutation P values against the first model."""
    from hctembed.workflows.bench_finetune import run_bench_finetune

    setup_logging(quiet=quiet)
    request = _finetune_request(
        archive=archive, labels=labels, columns=columns, out_dir=out_dir, weights=weights, no_scratch=no_scratch,
        arch=arch, epochs=epochs, batch_size=batch_size, lr_backbone=lr_backbone, lr_head=lr_head,
        warmup_fraction=warmup_fraction,
        samples_per_epoch=samples_per_epoch, pool=pool, ratios=ratios, seed=seed, n_resamples=n_resamples,
        n_permutations=n_permutations,
    )  # fmt: skip
    show_results(run_bench_finetune(request, progress=BarProgress(quiet=quiet)), out_dir=out_dir, as_json=as_json)
