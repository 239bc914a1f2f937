"""`hctembed bench` over two models in one DB, and `hctembed probe train|apply`, via typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.eval.classification import roc_auc
from hctembed.eval.retrieval import all_vs_all
from hctembed.index.store import Store
from hctembed.io.labels import read_labels

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("archive")
    assert invoke("synth", root, "--n", "24", "--seed", "3", "--matrix", "64", "--quiet").exit_code == 0
    db = tmp_path_factory.mktemp("db") / "h.duckdb"
    model_ids = []
    for seed in (0, 1):
        result = invoke(
            "embed", root, "--db", db, "--model", "vit-micro", "--seed", seed, "--workers", "0", "--json", "-q"
        )
        assert result.exit_code == 0, result.output
        model_ids.append(json.loads(result.stdout.strip().splitlines()[-1])["model_id"])
    assert model_ids[0] != model_ids[1]
    return root, db, model_ids


@pytest.mark.slow
def test_bench_retrieval_two_models_writes_report(two_models, tmp_path):
    root, db, (m0, m1) = two_models
    out = tmp_path / "ret"
    result = invoke(
        "bench",
        "retrieval",
        "--db",
        db,
        "--labels",
        root / "labels.csv",
        "--model",
        m0,
        "--model",
        m1,
        "--out-dir",
        out,
        "--json",
        "--n-permutations",
        "200",
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == [m0, m1] and "AP" in saved["definition"] and "permutation" in saved["statistics"]
    for name in ("map_per_label.png", "precision_at_k.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert m0 in md and m1 in md and "| mean |" in md
    # values agree with the library on the same vectors
    table = read_labels(root / "labels.csv")
    with Store(db, read_only=True) as store:
        _, x, scan_ids = store.resolve_collection(model_id=m1).vectors()
    order = np.argsort(scan_ids)
    ref = all_vs_all(x[order], table.for_scans(sorted(scan_ids)), label_names=table.names)
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    for lab in ref.labels:
        row = next(r for r in rows if r["row"] == lab.label and r["model"] == m1)
        if lab.n_queries:
            assert row["mAP"] == pytest.approx(lab.mAP)
            assert row["mAP_low"] <= row["mAP"] <= row["mAP_high"]
            assert 0 < row["P_mAP"] <= 1
    assert all("P_mAP" not in r for r in rows if r["model"] == m0)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["knn", "linear", "attentive", "fewshot"])
def test_bench_classification_protocols(two_models, tmp_path, protocol):
    root, db, (m0, m1) = two_models
    out = tmp_path / protocol
    extra = ["--ks", "2,4,64", "--draws", "3"] if protocol == "fewshot" else ["--n-permutations", "100"]
    if protocol == "attentive":  # patch tokens recomputed from the scan files with each stored encoder
        extra += ["--epochs", "2", "--samples-per-epoch", "16"]
    result = invoke(
        "bench",
        protocol,
        "--db",
        db,
        "--labels",
        root / "labels.csv",
        "--model",
        m0,
        "--model",
        m1,
        "--ratios",
        "0.5,0.0,0.5",
        "--out-dir",
        out,
        "--json",
        "--n-resamples",
        "50",
        *extra,
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == [m0, m1] and (out / "results.md").exists()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == (
        ["fewshot_ap.png", "fewshot_auc.png"] if protocol == "fewshot" else ["ap_per_task.png", "auc_per_task.png"]
    )
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    if protocol == "fewshot":
        assert {r["K"] for r in rows} == {2, 4, 64}
        assert all(r["skip_reason"] and "K=64" in r["skip_reason"] for r in rows if r["K"] == 64)
        scored = [r for r in rows if r["model"] == m1 and r["K"] == 2 and r.get("AUC") is not None]
        assert scored and all(0 < r["P_draws_AUC"] <= 1 for r in scored)
        assert "P over draws (AUC)" in (out / "results.md").read_text()
    else:
        evaluated = [r for r in rows if r.get("AUC") is not None]
        skipped = [r for r in rows if r.get("skip_reason")]
        assert evaluated or skipped
        assert all(0 <= r["AUC"] <= 1 for r in evaluated)


@pytest.mark.slow
def test_probe_train_apply_writes_scores(two_models, tmp_path):
    root, db, (m0, _) = two_models
    probe_file = tmp_path / "sdh.json"
    result = invoke(
        "probe",
        "train",
        "--db",
        db,
        "--labels",
        root / "labels.csv",
        "--task",
        "SDH",
        "--model",
        m0,
        "--out",
        probe_file,
        "--ratios",
        "0.5,0.0,0.5",
        "--json",
        "-q",
    )
    assert result.exit_code == 0, result.output
    trained = json.loads(result.stdout.strip().splitlines()[-1])
    result = invoke("probe", "apply", probe_file, "--db", db, "--json", "-q")
    assert result.exit_code == 0, result.output
    applied = json.loads(result.stdout.strip().splitlines()[-1])
    assert applied["probe_id"] == trained["probe_id"] and applied["scored"] == 24
    doc = json.loads(probe_file.read_text())
    with Store(db, read_only=True) as store:
        scores = store.probes.scores(applied["probe_id"])
        _, x, scan_ids = store.resolve_collection(model_id=m0).vectors()
        assert store.db.rows("SELECT task FROM probes WHERE probe_id = ?", [applied["probe_id"]]) == [("SDH",)]
    z = x.astype(np.float64) @ np.asarray(doc["coef"]) + doc["intercept"]
    np.testing.assert_allclose([scores[s] for s in scan_ids], 1 / (1 + np.exp(-z)), rtol=1e-6)
    assert roc_auc(np.ones(1), np.ones(1)) != roc_auc(np.ones(1), np.ones(1))  # NaN on one class


def test_bench_errors_are_one_line(tmp_path):
    result = invoke("bench", "linear", "--db", tmp_path / "missing.duckdb", "--labels", tmp_path / "l.csv")
    assert result.exit_code == 2


@pytest.mark.slow
def test_stored_labels_and_the_newest_model_are_the_defaults(two_models):
    root, db, (_, m1) = two_models
    explicit = invoke("bench", "retrieval", "--db", db, "--labels", root / "labels.csv", "--model", m1, "--json")
    default = invoke("bench", "retrieval", "--db", db, "--json")  # no --labels, no --model
    assert explicit.exit_code == 0 and default.exit_code == 0, default.output
    assert "most recently embedded" in default.stderr and m1 in default.stderr
    rows, ref = ([json.loads(line) for line in r.stdout.strip().splitlines()] for r in (default, explicit))
    assert {r["label"]: (r["mAP"], r["chance"]) for r in rows} == {r["label"]: (r["mAP"], r["chance"]) for r in ref}
    scored = [r for r in rows if r["queries"]]
    assert scored and all(0 < r["chance"] < 1 for r in scored)
    assert all(r["note"].startswith("no query") for r in rows if not r["queries"] and r["label"] != "mean")
    found = invoke("search", "--id", read_labels(root / "labels.csv").scan_ids[0], "--db", db, "-k", "3", "--json")
    assert found.exit_code == 0 and len(found.stdout.strip().splitlines()) == 3
    assert "most recently embedded" in found.stderr
    # a prefix that matches nothing, and a database without labels, are one-line errors
    bad = invoke("bench", "retrieval", "--db", db, "--model", "no-such-model")
    assert bad.exit_code == 2 and "no embeddings for model no-such-model" in bad.stderr
