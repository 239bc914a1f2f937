"""``hctembed bench``: evaluation protocols over stored embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hctembed.cli.common import (
    friendly_errors,
    json_safe,
    print_json_lines,
    print_table,
    progress_bar,
    setup_logging,
    stderr,
)

app = typer.Typer(help="Benchmarks over stored embeddings.", no_args_is_help=True)


@app.command("retrieval")
@friendly_errors
def retrieval(
    db: list[Path] = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed` (repeatable)."),
    labels: Path = typer.Option(..., "--labels", help="CSV with scan_id, patient_id and 0/1 label columns."),
    model: list[str] | None = typer.Option(
        None, "--model", help="Model id (prefix) when the DB holds several; repeat to compare models."
    ),
    columns: str | None = typer.Option(None, "--columns", help="Comma-separated label columns (default: all 0/1)."),
    exclude_same_patient: bool = typer.Option(
        False, "--exclude-same-patient", help="Leave the query patient's other scans out of its gallery."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the full results (per-query AP too) as JSON."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines (one per label and a mean row)."),
    out_dir: Path | None = typer.Option(
        None, "--out-dir", help="Write results.json, results.md and PNG plots (CIs, P values) here."
    ),
    n_resamples: int = typer.Option(100, "--n-resamples", min=1, help="Bootstrap resamples for 95% CIs."),
    n_permutations: int = typer.Option(1000, "--n-permutations", min=1, help="Permutations of the paired test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap and permutation test."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """All-vs-all retrieval per label (FM-HCT Methods): mAP and P@1/5/10 per subtype and their mean.

    With several models (or --out-dir): bootstrap CIs over queries, paired permutation P values against the
    first model, and results.json, results.md and plots in --out-dir."""
    from hctembed.eval.bench import retrieval_benchmark
    from hctembed.io.labels import read_labels

    setup_logging(quiet=quiet)
    table = read_labels(labels, columns=columns.split(",") if columns else None)
    sources = _sources(db, model)
    if len(sources) > 1 or out_dir is not None:
        from hctembed.eval.protocols import compare_retrieval, load_aligned

        results = compare_retrieval(
            load_aligned(sources, labels=table),
            exclude_same_patient=exclude_same_patient,
            n_resamples=n_resamples,
            n_permutations=n_permutations,
            seed=seed,
        )
        _finish(results, out_dir=out_dir, out=out, as_json=as_json)
        return
    report, model_id = retrieval_benchmark(sources[0], labels=table, exclude_same_patient=exclude_same_patient)
    rows = [{"model_id": model_id, **row} for row in report.rows()]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe({"model_id": model_id, **report.to_dict()}), indent=2))
        stderr.print(f"wrote {out}")
    if as_json:
        print_json_lines(rows)
    else:
        print_table(
            [{k: v for k, v in r.items() if k != "model_id"} for r in rows],
            title=f"retrieval, {model_id}, {report.n_scans} scans"
            + (", same patient excluded" if exclude_same_patient else ""),
        )


def _sources(dbs: list[Path], models: list[str] | None):
    """(db, model) pairs: several models in one DB, one model (or none) per DB, or one model per DB in order."""
    from hctembed.eval.protocols import Source

    models = list(models or [])
    if len(dbs) == 1:
        return [Source(dbs[0], m) for m in models] or [Source(dbs[0], None)]
    if not models:
        return [Source(d, None) for d in dbs]
    if len(models) == 1:
        return [Source(d, models[0]) for d in dbs]
    if len(models) == len(dbs):
        return [Source(d, m) for d, m in zip(dbs, models, strict=True)]
    raise typer.BadParameter(f"{len(dbs)} --db and {len(models)} --model: give one --model, or one per --db")


def _flat_rows(results: dict) -> list[dict]:
    """One flat dict per (row, model): metric value, CI bounds, and P vs the first model."""
    out = []
    if results["protocol"] == "fewshot":
        for curve in results["curves"]:
            for pt in curve["points"]:
                flat = {"task": curve["task"], "model": curve["model"], "K": pt["K"]}
                for m in ("AUC", "AP"):
                    e = pt[m] or {}
                    flat.update({m: e.get("value"), f"{m}_low": e.get("low"), f"{m}_high": e.get("high")})
                flat["skip_reason"] = pt["skip_reason"]
                out.append(flat)
        return out
    for row in results["rows"]:
        flat = {"row": row["row"], "model": row["model"]}
        for m in results["metrics"]:
            e = row["metrics"].get(m) or {}
            flat.update({m: e.get("value"), f"{m}_low": e.get("low"), f"{m}_high": e.get("high")})
            if m in row["p_values"]:
                flat[f"P_{m}"] = row["p_values"][m]
        if row.get("skip_reason"):
            flat["skip_reason"] = row["skip_reason"]
        out.append(flat)
    return out


def _finish(results: dict, *, out_dir: Path | None, out: Path | None = None, as_json: bool) -> None:
    from hctembed.eval.report import write_report

    if out_dir is not None:
        for path in write_report(out_dir, results):
            stderr.print(f"wrote {path}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe(results), indent=2))
        stderr.print(f"wrote {out}")
    rows = [{"protocol": results["protocol"], **r} for r in _flat_rows(results)]
    if as_json:
        print_json_lines(rows)
    else:
        print_table(
            [{k: v for k, v in r.items() if k != "protocol"} for r in rows],
            title=f"{results['protocol']}, {len(results['models'])} model(s), {results['n_scans']} scans",
        )


def _common(db: list[Path], model: list[str] | None, labels: Path, columns: str | None, ratios: str, seed: int):
    from hctembed.eval.protocols import load_aligned
    from hctembed.eval.splits import patient_split
    from hctembed.io.labels import read_labels

    table = read_labels(labels, columns=columns.split(",") if columns else None)
    data = load_aligned(_sources(db, model), labels=table)
    parts = tuple(float(r) for r in ratios.split(","))
    if len(parts) != 3:
        raise typer.BadParameter(f"--ratios needs three numbers (train,val,test), got {ratios!r}")
    if any(p is None for p in data.patient_ids):
        raise ValueError("patient-level splits need a patient_id for every scan (labels.csv column)")
    return data, patient_split(data.patient_ids, ratios=parts, seed=seed)


DB = typer.Option(..., "--db", help="DuckDB file (repeatable: one model per file).")
LABELS = typer.Option(..., "--labels", help="CSV with scan_id, patient_id and 0/1 label columns.")
MODEL = typer.Option(None, "--model", help="Model id (prefix); repeat to compare models in one DB.")
COLUMNS = typer.Option(None, "--columns", help="Comma-separated label columns (default: all 0/1).")
OUT_DIR = typer.Option(None, "--out-dir", help="Write results.json, results.md and PNG plots here.")
RATIOS = typer.Option("0.8,0.1,0.1", "--ratios", help="Patient-level train,val,test ratios.")
SEED = typer.Option(0, "--seed", help="Seed of the split, sampling, bootstrap and permutations.")
RESAMPLES = typer.Option(100, "--n-resamples", min=1, help="Bootstrap resamples for 95% CIs.")
PERMUTATIONS = typer.Option(1000, "--n-permutations", min=1, help="Permutations of the paired test.")
JSON = typer.Option(False, "--json", help="JSON lines, one per row and model.")
QUIET = typer.Option(False, "--quiet", "-q")


@app.command("knn")
@friendly_errors
def knn(
    db: list[Path] = DB,
    labels: Path = LABELS,
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
    from hctembed.eval.classification import knn_fit_score
    from hctembed.eval.protocols import compare_classification

    setup_logging(quiet=quiet)
    data, split = _common(db, model, labels, columns, ratios, seed)
    fit = knn_fit_score(k=k, temperature=temperature, weights="uniform" if uniform else "temperature")
    results = compare_classification(
        data,
        method="knn",
        fit_score=lambda m: fit,
        split=split,
        n_resamples=n_resamples,
        n_permutations=n_permutations,
        seed=seed,
    )
    results["params"] = {"k": k, "temperature": temperature, "weights": "uniform" if uniform else "temperature"}
    _finish(results, out_dir=out_dir, as_json=as_json)


@app.command("linear")
@friendly_errors
def linear(
    db: list[Path] = DB,
    labels: Path = LABELS,
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
    from hctembed.eval.classification import linear_fit_score
    from hctembed.eval.protocols import compare_classification

    setup_logging(quiet=quiet)
    data, split = _common(db, model, labels, columns, ratios, seed)
    fit = linear_fit_score(C=c, seed=seed)
    results = compare_classification(
        data,
        method="linear",
        fit_score=lambda m: fit,
        split=split,
        n_resamples=n_resamples,
        n_permutations=n_permutations,
        seed=seed,
    )
    results["params"] = {"C": c, "class_weight": "balanced"}
    _finish(results, out_dir=out_dir, as_json=as_json)


@app.command("attentive")
@friendly_errors
def attentive(
    db: list[Path] = DB,
    labels: Path = LABELS,
    model: list[str] | None = MODEL,
    columns: str | None = COLUMNS,
    tokens: list[Path] | None = typer.Option(
        None,
        "--tokens",
        help="Precomputed patch tokens (.npz: scan_ids, tokens), one per model in order; "
        "default: recomputed from the scan files with the stored encoder.",
    ),
    epochs: int = typer.Option(10, "--epochs", min=1),
    samples_per_epoch: int = typer.Option(500, "--samples-per-epoch", min=2, help="Balanced sample per epoch."),
    heads: int = typer.Option(4, "--heads", min=1),
    out_dir: Path | None = OUT_DIR,
    ratios: str = RATIOS,
    seed: int = SEED,
    n_resamples: int = RESAMPLES,
    n_permutations: int = PERMUTATIONS,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Attentive probe per label: a learned query over the encoder's patch tokens (torch); AUC and AP."""
    from hctembed.eval.protocols import compare_classification
    from hctembed.index.store import Store
    from hctembed.probe.attentive import attentive_fit_score
    from hctembed.probe.tokens import compute_tokens, read_tokens_file

    setup_logging(quiet=quiet)
    data, split = _common(db, model, labels, columns, ratios, seed)
    tokens = list(tokens or [])
    if tokens and len(tokens) != len(data.model_ids):
        raise typer.BadParameter(f"{len(tokens)} --tokens for {len(data.model_ids)} models")
    feats = []
    for m, src in enumerate(data.sources):
        if tokens:
            feats.append(read_tokens_file(tokens[m], data.scan_ids))
            continue
        with Store(src["db"], read_only=True) as store, progress_bar(quiet=quiet) as bar:
            coll = next(c for c in store.collections() if c.collection_id == src["collection_id"])
            task = bar.add_task(f"patch tokens, {src['model_id']}", total=len(data.scan_ids))
            feats.append(compute_tokens(store, coll, data.scan_ids, progress=lambda n, t=task: bar.advance(t, n)))
    config_kw = {"epochs": epochs, "samples_per_epoch": samples_per_epoch, "heads": heads, "seed": seed}
    fit = attentive_fit_score(config_kw=config_kw)
    results = compare_classification(
        data,
        method="attentive",
        fit_score=lambda m: fit,
        split=split,
        features=feats,
        n_resamples=n_resamples,
        n_permutations=n_permutations,
        seed=seed,
    )
    results["params"] = config_kw
    _finish(results, out_dir=out_dir, as_json=as_json)


@app.command("fewshot")
@friendly_errors
def fewshot(
    db: list[Path] = DB,
    labels: Path = LABELS,
    model: list[str] | None = MODEL,
    columns: str | None = COLUMNS,
    ks: str = typer.Option("8,16,32,64,128,256", "--ks", help="K positives and K negatives per task."),
    draws: int = typer.Option(5, "--draws", min=1, help="Random training draws per K."),
    probe: str = typer.Option("linear", "--probe", help="linear or knn, trained on the K + K scans."),
    out_dir: Path | None = OUT_DIR,
    ratios: str = RATIOS,
    seed: int = SEED,
    n_resamples: int = RESAMPLES,
    as_json: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Few-shot curves: K positives + K negatives per task, several draws; AUC and AP on the test split."""
    from hctembed.eval.classification import knn_fit_score, linear_fit_score
    from hctembed.eval.protocols import compare_fewshot

    setup_logging(quiet=quiet)
    if probe not in ("linear", "knn"):
        raise typer.BadParameter(f"--probe must be linear or knn, not {probe!r}")
    data, split = _common(db, model, labels, columns, ratios, seed)
    fit = linear_fit_score(seed=seed) if probe == "linear" else knn_fit_score()
    results = compare_fewshot(
        data,
        fit_score=lambda m: fit,
        split=split,
        ks=[int(k) for k in ks.split(",")],
        n_draws=draws,
        n_resamples=n_resamples,
        seed=seed,
        probe=probe,
    )
    _finish(results, out_dir=out_dir, as_json=as_json)
