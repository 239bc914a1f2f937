"""``hctembed probe``: train a probe for one task on stored embeddings, and apply it (scores into DuckDB)."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import friendly_errors, print_json_lines, print_table, progress_bar, setup_logging, stderr

app = typer.Typer(help="Train and apply probes on frozen embeddings.", no_args_is_help=True)


def _tokens(store, coll, scan_ids, tokens: Path | None, quiet: bool):
    from hctembed.probe.tokens import compute_tokens, read_tokens_file

    if tokens is not None:
        return read_tokens_file(tokens, scan_ids)
    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("patch tokens", total=len(scan_ids))
        return compute_tokens(store, coll, scan_ids, progress=lambda n: bar.advance(task, n))


@app.command("train")
@friendly_errors
def train(
    db: Path = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed`."),
    labels: Path = typer.Option(..., "--labels", help="CSV with scan_id, patient_id and 0/1 label columns."),
    task: str = typer.Option(..., "--task", help="Label column to predict (e.g. SDH)."),
    out: Path = typer.Option(..., "--out", help="Probe file: .json (linear) or .safetensors (attentive)."),
    kind: str = typer.Option("linear", "--kind", help="linear or attentive."),
    model: str | None = typer.Option(None, "--model", help="Model id (prefix) when the DB holds several."),
    tokens: Path | None = typer.Option(None, "--tokens", help="Precomputed patch tokens (.npz) for attentive."),
    ratios: str = typer.Option("0.8,0.1,0.1", "--ratios", help="Patient-level train,val,test ratios."),
    seed: int = typer.Option(0, "--seed"),
    epochs: int = typer.Option(10, "--epochs", min=1),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Train on the patient-level train split, report test AUC/AP, save the probe and register it in the DB."""
    import numpy as np

    from hctembed.eval.classification import evaluate_task, fit_linear_probe
    from hctembed.eval.protocols import Source, load_aligned
    from hctembed.eval.splits import patient_split
    from hctembed.index.store import Store
    from hctembed.io.labels import read_labels
    from hctembed.probe.scores import make_probe_id, register_probe

    setup_logging(quiet=quiet)
    if kind not in ("linear", "attentive"):
        raise typer.BadParameter(f"--kind must be linear or attentive, not {kind!r}")
    if (kind == "linear") != (out.suffix == ".json") or (kind == "attentive") != (out.suffix == ".safetensors"):
        raise typer.BadParameter("--out must end in .json for a linear probe, .safetensors for an attentive one")
    table = read_labels(labels, columns=[task])
    data = load_aligned([Source(db, model)], labels=table)
    if any(p is None for p in data.patient_ids):
        raise ValueError("patient-level splits need a patient_id for every scan (labels.csv column)")
    split = patient_split(data.patient_ids, ratios=tuple(float(r) for r in ratios.split(",")), seed=seed)
    y = data.y[:, 0]
    model_id = data.sources[0]["model_id"]
    meta = {"model_id": model_id, "task": task, "split": split.to_dict()}
    if kind == "linear":
        from hctembed.eval.classification import linear_fit_score
        from hctembed.probe.linear_file import save_linear

        feats = data.x[0]
        fit = linear_fit_score(seed=seed)
        result = evaluate_task(fit, feats, y, task=task, train=split.train, test=split.test, seed=seed)
        train_idx = split.train[~np.isnan(y[split.train])]
        save_linear(fit_linear_probe(feats[train_idx], y[train_idx], seed=seed), out, meta=meta)
        config = {"C": 1.0, "class_weight": "balanced"}
    else:
        from hctembed.probe.attentive import AttentiveConfig, attentive_fit_score, save_attentive, train_attentive

        with Store(db, read_only=True) as store:
            coll = store.resolve_collection(model_id=model)
            feats = _tokens(store, coll, data.scan_ids, tokens, quiet)
        config_kw = {"epochs": epochs, "seed": seed}
        result = evaluate_task(
            attentive_fit_score(config_kw=config_kw),
            feats,
            y,
            task=task,
            train=split.train,
            test=split.test,
            seed=seed,
        )
        train_idx = split.train[~np.isnan(y[split.train])]
        probe = train_attentive(feats[train_idx], y[train_idx], config=AttentiveConfig(dim=feats.shape[2], **config_kw))
        save_attentive(probe, out, meta=meta)
        config = config_kw
    probe_id = make_probe_id(kind=kind, model_id=model_id, task=task, content=out.read_bytes())
    metrics = result.to_dict()
    with Store(db) as store:
        register_probe(
            store,
            probe_id=probe_id,
            kind=kind,
            model_id=model_id,
            task=task,
            path=str(out.resolve()),
            config=config,
            metrics=metrics,
        )
    stderr.print(f"wrote {out}")
    row = {
        "probe_id": probe_id,
        "task": task,
        "model_id": model_id,
        "n_train": result.n_train,
        "n_test": result.n_test,
        "test_AUC": result.auc.value if result.auc else None,
        "test_AP": result.ap.value if result.ap else None,
        "note": result.skip_reason,
    }
    if as_json:
        print_json_lines([row])
    else:
        print_table([row], title="probe train")


@app.command("apply")
@friendly_errors
def apply(
    probe_file: Path = typer.Argument(..., help="A probe written by `hctembed probe train`."),
    db: Path = typer.Option(..., "--db", help="DuckDB file holding the probe's model's embeddings."),
    tokens: Path | None = typer.Option(None, "--tokens", help="Precomputed patch tokens (.npz) for attentive."),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Score every stored scan of the probe's model and write the scores to the DB (probe_scores table)."""
    from hctembed.index.store import Store
    from hctembed.probe.scores import make_probe_id, register_probe, write_scores

    setup_logging(quiet=quiet)
    if probe_file.suffix == ".json":
        from hctembed.probe.linear_file import load_linear

        probe, meta = load_linear(probe_file)
        kind = "linear"
    else:
        from hctembed.probe.attentive import load_attentive

        probe, meta = load_attentive(probe_file)
        kind = "attentive"
    model_id, task = meta["model_id"], meta["task"]
    probe_id = make_probe_id(kind=kind, model_id=model_id, task=task, content=probe_file.read_bytes())
    with Store(db) as store:
        coll = store.resolve_collection(model_id=model_id)
        if coll.model_id != model_id:
            raise ValueError(f"probe was trained on {model_id}, the DB holds {coll.model_id}")
        _, x, scan_ids = store.vectors(coll)
        if kind == "linear":
            scores = probe.scores(x)
        else:
            from hctembed.probe.attentive import attentive_scores

            scores = attentive_scores(probe, _tokens(store, coll, scan_ids, tokens, quiet))
        if not store.con.execute("SELECT 1 FROM probes WHERE probe_id = ?", [probe_id]).fetchall():
            path = str(probe_file.resolve())
            register_probe(
                store, probe_id=probe_id, kind=kind, model_id=model_id, task=task, path=path, config={}, metrics={}
            )
        n = write_scores(store, probe_id=probe_id, model_id=model_id, task=task, scan_ids=scan_ids, scores=scores)
    row = {
        "probe_id": probe_id,
        "task": task,
        "model_id": model_id,
        "scored": n,
        "mean_score": float(scores.mean()) if n else None,
    }
    if as_json:
        print_json_lines([row])
    else:
        print_table([row], title="probe apply")
