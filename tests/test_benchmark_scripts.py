"""The benchmark scripts are run by hand (and on a GPU host as one prepared command, where a broken import
would waste the machine): every one must at least import against the current package."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(script)
    assert callable(getattr(module, "main", None)), f"benchmarks/{script}.py has no main()"
    sys.modules.pop(script, None)


def test_learning_benchmark_describes_what_embeddings_hold(monkeypatch):
    """The evidence script's ``embedding_contents`` against constructed embeddings with known answers and
    scikit-learn's variance-weighted R²."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("learning_synthetic")
    rng = np.random.default_rng(0)
    patients = [f"p{i // 2}" for i in range(40)] + ["p-alone"]  # 20 patients with 2 scans, one with 1
    y = rng.integers(0, 2, size=(41, 5))
    identity = rng.normal(size=(21, 8))[[i // 2 for i in range(40)] + [20]]  # one vector per patient
    held = module.embedding_contents(identity, patients=patients, y=y)
    assert held["between_patient_share"] == pytest.approx(1.0) and held["nearest_is_same_patient"] == 1.0
    assert held["scans_with_another"] == 40 and held["between_patient_share_shuffled"] < 0.8
    noise = rng.normal(size=identity.shape)  # patients do not matter: the share sits at its shuffled level
    held = module.embedding_contents(noise, patients=patients, y=y)
    assert abs(held["between_patient_share"] - held["between_patient_share_shuffled"]) < 0.15
    noisy = identity + rng.normal(scale=0.5, size=identity.shape)
    held = module.embedding_contents(noisy, patients=patients, y=y)
    want = r2_score(noisy, LinearRegression().fit(y, noisy).predict(y), multioutput="variance_weighted")
    assert held["bleed_label_r2"] == pytest.approx(want, abs=1e-4)
    assert held["between_patient_share_shuffled"] < held["between_patient_share"] < 1.0
    by_labels = y @ rng.normal(size=(5, 8))
    assert module.embedding_contents(by_labels, patients=patients, y=y)["bleed_label_r2"] == pytest.approx(1.0)
    sys.modules.pop("learning_synthetic", None)


@pytest.mark.slow
def test_gpu_learning_script_runs_end_to_end_at_toy_size(monkeypatch, tmp_path, capsys):
    """The one command a lent GPU runs, at toy size on the CPU: archive, recipe DINO with its step time measured,
    frozen and few-shot evaluation, the JSON and the picture named by the card, so a GPU's minutes are not spent
    finding a broken stage."""
    import json

    from hctembed.model.checkpoint import load_encoder_weights

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("gpu_learning")
    summary = module.main(["--out", str(tmp_path), "--budget", "toy", "--device", "cpu"])
    assert summary["card"] == "cpu" and summary["model"] == "vit-micro"
    assert (tmp_path / "gpu_learning_cpu.json").is_file()
    assert (tmp_path / "gpu_learning_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pre = summary["pretraining"]
    assert pre["seconds_per_step"] > 0 and pre["epochs"] == 1 and pre["steps"] >= 1
    # the recipe's values, each with its source; the toy size's own prototypes recorded as the user's
    assert pre["recipe_sources"]["prototypes"] == "user" and "DINO" in pre["recipe_sources"]["clip_mode"]
    encoder, _ = load_encoder_weights(tmp_path / "dino_run" / "encoder.safetensors")
    card = json.loads((tmp_path / "dino_run" / "encoder.json").read_text())["card"]
    assert encoder.config.input_norm == "standardise" and card["clip_mode"] == "per-parameter"
    assert "fmhct" in str(card["recipe"]) and pre["peak_lr"] == pytest.approx(3e-4 * 4 / 256)  # the linear rule
    for metric in ("retrieval_map", "linear_auc"):
        rows = summary["frozen"][metric]
        assert set(rows) == {"random init", "DINO (fmhct)"}
        assert all(0.0 <= r["estimate"]["value"] <= 1.0 for r in rows.values())
    assert [c["task"] for c in summary["fewshot"]["curves"] if c["model"] == "scratch"][-1] == "mean"
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {line["card"] for line in lines} == {"cpu"} and "total_seconds" in lines[-1]
    sys.modules.pop("gpu_learning", None)


@pytest.mark.slow
def test_lesion_size_script_measures_every_scale_on_the_same_patients(monkeypatch, tmp_path, capsys):
    """The lesion-size curve at toy size: each scale's archive holds the same scans and labels (only the bleeds
    grow), every scale gets both encoders' frozen metrics with P values, and the picture is drawn."""
    import csv

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("lesion_size")
    figure = tmp_path / "curve.png"
    result = module.main(["--out", str(tmp_path), "--budget", "toy", "--scales", "1,2", "--figure", str(figure)])
    assert [r["scale"] for r in result["rows"]] == [1.0, 2.0]
    labels = [list(csv.reader((tmp_path / f"archive_{s}" / "labels.csv").open())) for s in ("1", "2")]
    assert labels[0] == labels[1]  # same scans, same subtypes: only the lesion size differs
    for row in result["rows"]:
        assert row["scans"] == result["rows"][0]["scans"] and row["test_scans"] == result["rows"][0]["test_scans"]
        for key in ("retrieval_map", "linear_auc"):
            assert set(row[key]) == {"random init", "pretrained"} and row[key]["pretrained"]["p"] is not None
    assert figure.read_bytes()[:4] == b"\x89PNG"
    assert "| 2 | pretrained |" in capsys.readouterr().out
    sys.modules.pop("lesion_size", None)
    sys.modules.pop("gpu_learning", None)


def test_sanity_set_fills_the_field_with_the_class_and_marks_no_class_by_fill(monkeypatch, tmp_path):
    """The filled sanity set (v4): every volume holds many objects of its class covering a fraction of the field
    drawn from one range for all classes; a shell's objects enclose cavities and a sphere's do not; each volume is
    drawn from its own seed, so one rewritten volume comes back bit for bit."""
    import nibabel as nib
    from scipy import ndimage

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("learning_sanity")
    fill, size = (0.06, 0.12), (0.4, 0.55)
    for c, kind in enumerate(module.CLASSES):
        for i in range(2):
            mask = module.filled_mask(kind, grid=48, rng=np.random.default_rng([0, i, c]), fill=fill, size=size)
            assert fill[0] <= mask.mean() <= fill[1] + 0.02  # the last object may overshoot by its own volume
            assert ndimage.label(mask)[1] >= 4  # many objects, not one blob
            cavities = ndimage.binary_fill_holes(mask).sum() - mask.sum()
            if kind == "shell":
                assert cavities > 0.1 * mask.sum()  # (less where the field's edge cuts a shell open)
            if kind in ("sphere", "cube"):
                assert cavities < 0.02 * mask.sum()
    rows = module.make_set(tmp_path, per_class=2, grid=32, seed=0, hu=(35.0, 50.0), noise=(2.0, 5.0),
                           filled={"fill": fill, "size": size})  # fmt: skip
    assert len(rows) == 2 * len(module.CLASSES) and {k for _, k in rows} == set(module.CLASSES)
    first = tmp_path / f"{rows[3][0]}.nii.gz"
    before = np.asarray(nib.load(first).dataobj)
    assert before.min() < -900 and 20 < np.median(before[before > -500]) < 65  # objects in HU, in air
    first.unlink()
    module.make_set(tmp_path, per_class=2, grid=32, seed=0, hu=(35.0, 50.0), noise=(2.0, 5.0),
                    filled={"fill": fill, "size": size})  # fmt: skip
    assert np.array_equal(np.asarray(nib.load(first).dataobj), before)
    sys.modules.pop("learning_sanity", None)


def test_sanity_quick_runs_never_write_over_a_full_runs_files(monkeypatch, tmp_path):
    """make_set keeps volumes already written and pretraining resumes a run folder, so a quick run sharing --out
    with a full one must use its own volumes, runs and summary; variants on v4's set share v4's volumes."""
    from argparse import Namespace

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("learning_sanity")
    for variant in module.VARIANTS:
        full, quick = (Namespace(out=tmp_path, variant=variant, budget=b, input_norm="standardise")
                       for b in ("full", "quick"))  # fmt: skip
        paths = {b.budget: [module.folders(b), module.summary_path(b)] + [module.folders(b, m) for m in module.METHODS]
                 for b in (full, quick)}  # fmt: skip
        assert not set(paths["full"]) & set(paths["quick"]), variant
        assert len(set(paths["full"])) == len(paths["full"])
    v6 = Namespace(out=tmp_path, variant="v6", budget="full", input_norm="standardise")
    v4 = Namespace(out=tmp_path, variant="v4", budget="full", input_norm="standardise")
    assert module.folders(v6) == module.folders(v4) and module.folders(v6, "simclr") != module.folders(v4, "simclr")
    sys.modules.pop("learning_sanity", None)
