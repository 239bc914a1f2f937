"""The library workflows from Python, without the CLI: typed requests in, typed results out, the same numbers as
the commands print, progress through the Progress protocol, and user errors as HctembedError."""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.errors import HctembedError, InputError
from hctembed.index.store import Store
from hctembed.synth import SynthConfig, generate_archive
from hctembed.workflows.bench import BenchInputs, LinearRequest, RetrievalRequest, run_linear, run_retrieval
from hctembed.workflows.embed import EmbedRequest, run_embed
from hctembed.workflows.probe import ProbeTrainRequest, apply_probe, train_probe


class Recorder:
    """A Progress that records every task and how far it advanced."""

    def __init__(self) -> None:
        self.tasks: dict[str, list] = {}

    @contextmanager
    def task(self, description, *, total):
        seen = self.tasks.setdefault(description, [total, 0])
        yield lambda k: seen.__setitem__(1, seen[1] + k)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    archive = root / "archive"
    generate_archive(archive, n=16, seed=3, config=SynthConfig(matrix=48))
    request = EmbedRequest(archive=archive, db=root / "h.duckdb", model="vit-micro", workers=0, seed=1)
    progress = Recorder()
    summary = run_embed(request, progress=progress)
    return request, summary, progress


def busiest_label(archive) -> str:
    """The haemorrhage subtype closest to half positive in the fixture's labels."""
    import csv

    from hctembed.synth.lesions import SUBTYPES

    with open(archive / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    return min(SUBTYPES, key=lambda c: abs(sum(r[c] == "1" for r in rows) - len(rows) / 2))


def test_embed_request_runs_without_the_cli_and_reruns_idempotently(embedded):
    request, summary, progress = embedded
    assert (summary.scans, summary.embedded, summary.unchanged, summary.failed) == (16, 16, 0, [])
    assert progress.tasks["embedding"] == [16, 16]
    with Store(request.db, read_only=True) as store:
        assert store.resolve_collection().count() == 16
        assert store.resolve_collection().model_id == summary.model_id
    again = run_embed(request)
    assert (again.embedded, again.unchanged) == (0, 16)
    assert json.loads(json.dumps(again.to_dict()))["skips"] == []


def test_bad_requests_are_user_errors_before_any_work(tmp_path):
    with pytest.raises(InputError, match="--index must be one of"):
        EmbedRequest(archive=tmp_path, db=tmp_path / "x.duckdb", index="bogus")
    with pytest.raises(InputError, match="--kind"):
        ProbeTrainRequest(db=tmp_path / "x", labels=tmp_path / "l.csv", task="SDH", out=tmp_path / "p.json", kind="svm")
    with pytest.raises(InputError, match="ratios"):
        BenchInputs(dbs=(tmp_path / "x",), labels=tmp_path / "l.csv", ratios=(0.5, 0.5))
    assert not (tmp_path / "x.duckdb").exists()


def test_linear_bench_from_python_equals_the_command(embedded):
    request, _, _ = embedded
    labels, task = request.archive / "labels.csv", busiest_label(request.archive)
    for seed in range(20):  # the first split seed whose test part holds both classes
        inputs = BenchInputs(dbs=(request.db,), labels=labels, columns=(task,), ratios=(0.5, 0.0, 0.5), seed=seed,
                             n_resamples=20)  # fmt: skip
        results = run_linear(LinearRequest(inputs))
        ours = results.row(task, results.models[0])
        if "AUC" in ours.metrics:
            break
    assert "AUC" in ours.metrics, ours
    cli = CliRunner().invoke(
        app,
        ["bench", "linear", "--db", str(request.db), "--labels", str(labels), "--columns", task, "--ratios",
         "0.5,0.0,0.5", "--seed", str(seed), "--n-resamples", "20", "--json", "--quiet"],
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    printed = [json.loads(line) for line in cli.stdout.splitlines() if line.startswith("{")]
    theirs = next(r for r in printed if r["row"] == task)
    assert theirs["AUC"] == pytest.approx(ours.metrics["AUC"]["value"])
    assert theirs["AP"] == pytest.approx(ours.metrics["AP"]["value"])
    assert results.to_dict()["rows"][0]["row"] == results.rows[0].row  # the typed rows are what results.json holds


def test_single_model_retrieval_matches_a_brute_force_map(embedded):
    request, _, _ = embedded
    result = run_retrieval(RetrievalRequest(BenchInputs(dbs=(request.db,), labels=request.archive / "labels.csv")))
    with Store(request.db, read_only=True) as store:
        _, x, scan_ids = store.resolve_collection().vectors()
    import csv

    with open(request.archive / "labels.csv") as f:
        rows = {r["scan_id"]: r for r in csv.DictReader(f)}
    task = busiest_label(request.archive)
    y = np.array([float(rows[s][task]) for s in scan_ids])
    sims = x @ x.T
    aps = []
    for q in range(len(y)):
        others = np.delete(np.arange(len(y)), q)
        rel = y[others] == y[q]
        if rel.any() and y[q] == 1:
            order = np.argsort(-sims[q, others], kind="stable")
            hits = rel[order]
            precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
            aps.append(float((precision * hits).sum() / hits.sum()))
    row = next(r for r in result.rows() if r["label"] == task)
    assert row["mAP"] == pytest.approx(np.mean(aps), abs=1e-6)


def test_probe_train_and_apply_from_python(embedded, tmp_path):
    request, _, _ = embedded
    out, task = tmp_path / "probe.json", busiest_label(request.archive)
    trained = train_probe(
        ProbeTrainRequest(db=request.db, labels=request.archive / "labels.csv", task=task, out=out,
                          ratios=(0.5, 0.0, 0.5))
    )  # fmt: skip
    assert out.exists() and trained.probe_id.startswith(f"linear-{task}-")
    applied = apply_probe(out, db=request.db)
    assert applied.scored == 16
    with Store(request.db, read_only=True) as store:
        scores = store.probes.scores(trained.probe_id)
    assert len(scores) == 16


def test_only_user_errors_become_one_line_exit_2(tmp_path):
    """A bad labels file is the user's (exit 2, one line); the same command never swallows a bug's traceback."""
    bad = tmp_path / "labels.csv"
    bad.write_text("scan,SDH\na,1\n")
    result = CliRunner().invoke(app, ["bench", "linear", "--db", str(tmp_path / "x.duckdb"), "--labels", str(bad)])
    assert result.exit_code == 2
    assert "no scan_id column" in result.output and "Traceback" not in result.output
    assert issubclass(InputError, HctembedError) and issubclass(InputError, ValueError)

    from hctembed.cli.common import friendly_errors

    @friendly_errors
    def buggy():
        raise ValueError("internal invariant broken")

    with pytest.raises(ValueError, match="internal invariant"):
        buggy()


def test_roc_reference_is_sklearn():
    """The AUC the probes report is scikit-learn's on the same scores (guards the reference used above)."""
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.1, 0.8, 0.3, 0.7, 0.2])
    from hctembed.eval.classification import roc_auc

    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
