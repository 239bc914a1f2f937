"""The CLI end to end on a small synthetic archive: synth -> embed -> search -> bench, with typer's CliRunner."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.eval.retrieval import all_vs_all
from hctembed.index.store import Store
from hctembed.io.labels import read_labels

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    result = invoke("synth", root, "--n", "10", "--seed", "5", "--matrix", "64", "--quiet")
    assert result.exit_code == 0, result.output
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.fixture(scope="module")
def db(archive, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("db") / "h.duckdb"
    result = invoke("embed", archive, "--db", path, "--model", "vit-micro", "--workers", "1", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["scans"] == 11 and summary["embedded"] == 10 and summary["failed"] == 1
    assert summary["failures"][0]["source"] == "broken.nii.gz"
    assert "unreadable" in summary["failures"][0]["reason"]
    return path


def test_embed_stores_every_good_scan_and_indexes_them(db, archive):
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        ids, x, scan_ids = coll.vectors()
        assert sorted(scan_ids) == sorted(p.name[: -len(".nii.gz")] for p in archive.glob("synth-*.nii.gz"))
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
        assert coll.failures()[0][0] == "broken.nii.gz"
        # patient ids and labels came from ARCHIVE/labels.csv
        rows = coll.hits(ids.tolist())
        assert all(r.patient_id.startswith("synth-p") for r in rows.values())
        assert set(store.labels.of()[scan_ids[0]]) >= {"EDH", "SDH", "IPH", "IVH", "SAH"}
        model = store.models.get(coll.model_id)
        # random init: no weights file, the seed in the card rebuilds it for queries (tests/test_random_init.py)
        assert model.weights_path is None and model.card == {"init": "random", "seed": 0}
    assert not Path(str(db) + ".models").exists()
    index_path, manifest_path = coll.index_files()
    index = faiss.read_index(str(index_path))
    assert index.ntotal == len(ids)
    assert json.loads(manifest_path.read_text())["ntotal"] == len(ids)


def test_rerun_is_idempotent(db, archive):
    with Store(db, read_only=True) as store:
        before = store.resolve_collection().vectors()
    result = invoke("embed", archive, "--db", db, "--model", "vit-micro", "--workers", "0", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["embedded"] == 0 and summary["unchanged"] == 10 and summary["failed"] == 1
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        after = coll.vectors()
        assert coll.status()["broken.nii.gz"].attempts == 1  # unchanged since it failed: not retried
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    retry = invoke("embed", archive, "--db", db, "--model", "vit-micro", "--workers", "0", "--retry-failed", "--quiet")
    assert retry.exit_code == 0, retry.output
    with Store(db, read_only=True) as store:
        assert store.resolve_collection().status()["broken.nii.gz"].attempts == 2


def test_search_by_file_finds_itself_first(db, archive):
    query = sorted(archive.glob("synth-*.nii.gz"))[3]
    result = invoke("search", query, "--db", db, "-k", "4", "--json")
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert len(hits) == 4
    assert hits[0]["scan_id"] == query.name[: -len(".nii.gz")]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    assert all(a["score"] >= b["score"] for a, b in itertools.pairwise(hits))
    assert hits[0]["patient_id"].startswith("synth-p") and "EDH" in hits[0]["labels"]
    table = invoke("search", query, "--db", db, "-k", "3")
    assert table.exit_code == 0 and query.name[: -len(".nii.gz")] in table.stdout


def test_search_by_id_matches_numpy_brute_force(db):
    with Store(db, read_only=True) as store:
        _, x, scan_ids = store.resolve_collection().vectors()
    q = 2
    result = invoke("search", "--id", scan_ids[q], "--db", db, "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.strip().splitlines()]
    scores = x @ x[q]
    scores[q] = -np.inf  # the query itself is left out
    order = np.argsort(-scores)[:5]
    assert [h["scan_id"] for h in hits] == [scan_ids[i] for i in order]
    np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-5)


def test_bench_retrieval_matches_library(db, archive, tmp_path):
    out = tmp_path / "results.json"
    labels = archive / "labels.csv"
    result = invoke(
        "bench", "retrieval", "--db", db, "--labels", labels, "--json", "--out", out, "--exclude-same-patient"
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [r["label"] for r in rows] == ["EDH", "SDH", "IPH", "IVH", "SAH", "mean"]
    table = read_labels(labels)
    with Store(db, read_only=True) as store:
        _, x, scan_ids = store.resolve_collection().vectors()
    patients = dict(zip(table.scan_ids, table.patient_ids, strict=True))
    expected = all_vs_all(
        x,
        table.for_scans(scan_ids),
        label_names=table.names,
        patient_ids=[patients[s] for s in scan_ids],
        exclude_same_patient=True,
    )
    for row, lab in zip(rows, expected.labels, strict=False):
        assert row["queries"] == lab.n_queries
        if lab.n_queries:
            assert row["mAP"] == pytest.approx(lab.mAP)
            assert row["P@5"] == pytest.approx(lab.precision_at[5])
        else:
            assert row["mAP"] is None
    saved = json.loads(out.read_text())
    assert "precision at their rank" in saved["definition"] and saved["exclude_same_patient"] is True


def test_index_file_deleted_is_rebuilt_on_search(db, tmp_path):
    import shutil

    copy = tmp_path / "copy.duckdb"
    shutil.copy(db, copy)
    shutil.copytree(str(db) + ".faiss", str(copy) + ".faiss")
    with Store(copy, read_only=True) as store:
        coll = store.resolve_collection()
        scan = coll.vectors()[2][0]
    index_path, _ = coll.index_files()
    index_path.write_bytes(index_path.read_bytes()[:64])  # truncated
    result = invoke("search", "--id", scan, "--db", copy, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 3
    assert faiss.read_index(str(index_path)).ntotal == 10


def test_errors_are_one_clear_line(tmp_path, archive):
    missing = invoke("search", "--id", "x", "--db", tmp_path / "none.duckdb")
    assert missing.exit_code == 2 and "no database" in missing.stderr
    both = invoke("search", "--db", tmp_path / "none.duckdb")
    assert both.exit_code == 2
    bad_model = invoke("embed", archive, "--db", tmp_path / "x.duckdb", "--model", "nope")
    assert bad_model.exit_code == 2 and "unknown model" in bad_model.stderr
    bad_weights = invoke("embed", archive, "--db", tmp_path / "x.duckdb", "--weights", tmp_path / "w.safetensors")
    assert bad_weights.exit_code == 2 and "not found" in bad_weights.stderr


def test_unknown_scan_id_is_a_clear_error(db):
    result = invoke("search", "--id", "no-such-scan", "--db", db)
    assert result.exit_code == 2 and "no such scan: 'no-such-scan'" in result.stderr


@pytest.mark.slow
def test_demo_command_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    result = invoke("demo", "--out", out, "--n", "8", "--model", "vit-micro")
    assert result.exit_code == 0, result.output
    assert "1/5" in result.stderr and "5/5" in result.stderr
    saved = json.loads((out / "retrieval.json").read_text())
    assert saved["n_scans"] == 8 and saved["exclude_same_patient"] is True
    assert "top 5" in result.stdout and "mean" in result.stdout and "chance" in result.stdout
    assert "for a random ranking" in result.stderr  # the numbers in context
    pictures = [out / "search.png", out / "explain" / "attention_last_layer.png", out / "map.png"]
    for path in pictures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(path) in result.stdout
    assert "<img" in (out / "search.html").read_text()
    # what only pretraining needed is gone, the encoder stays, and the disk used is said
    assert (out / "encoder" / "encoder.safetensors").exists()
    assert not (out / "encoder" / "cache").exists() and not (out / "encoder" / "checkpoint.pt").exists()
    assert "MB" in result.stdout and "removed" in result.stdout
    again = invoke("demo", "--out", out, "--n", "8", "--model", "vit-micro", "--keep")  # reuses archive, vectors
    assert again.exit_code == 0 and "reusing" in again.stderr


def test_search_hits_point_back_to_their_files(db, archive):
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        ids = coll.ids()
        rows = coll.hits(ids.tolist())
    assert len(rows) == len(ids)
    for row in rows.values():  # NIfTI scan ids are their paths (without suffix) unless --pseudonymise-files
        assert Path(row.path) == archive.resolve() / f"{row.scan_id}.nii.gz"
        assert Path(row.path).exists()


def test_a_changed_file_that_now_fails_loses_its_vector(tmp_path):
    root = tmp_path / "a"
    assert invoke("synth", root, "--n", "3", "--seed", "2", "--matrix", "48", "--quiet").exit_code == 0
    db = tmp_path / "h.duckdb"
    assert invoke("embed", root, "--db", db, "--model", "vit-micro", "--workers", "0", "--quiet").exit_code == 0
    victim = sorted(root.glob("*.nii.gz"))[0]
    victim.write_bytes(b"now broken")
    result = invoke("embed", root, "--db", db, "--model", "vit-micro", "--workers", "0", "--json", "--quiet")
    assert json.loads(result.stdout.strip().splitlines()[-1])["failed"] == 1
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        _, _, scan_ids = coll.vectors()
        assert victim.name[: -len(".nii.gz")] not in scan_ids and len(scan_ids) == 2
    assert faiss.read_index(str(coll.index_files()[0])).ntotal == 2


def test_two_archives_with_the_same_file_names_are_refused(tmp_path):
    for name in ("b", "c"):
        assert invoke("synth", tmp_path / name, "--n", "2", "--seed", "1", "--matrix", "48", "--quiet").exit_code == 0
    db = tmp_path / "h.duckdb"
    assert invoke("embed", tmp_path / "b", "--db", db, "--model", "vit-micro", "--workers", "0", "-q").exit_code == 0
    result = invoke("embed", tmp_path / "c", "--db", db, "--model", "vit-micro", "--workers", "0", "-q")
    assert result.exit_code == 2 and "already stored from" in " ".join(result.stderr.split())
    with Store(db, read_only=True) as store:
        assert store.resolve_collection().count() == 2  # nothing of b was lost


def _commands(command, path=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


def test_help_is_readable_at_80_columns_and_complete():
    """Every option says what it does, nothing is cut at 80 columns, flags read as flags, and --model's help
    names every architecture."""
    import os
    import subprocess
    import sys

    import typer

    from hctembed.config import FOREIGN_MODELS, VIT_PRESETS

    root = typer.main.get_command(app)
    undocumented = [
        (" ".join(path), p.opts[0])
        for path, command in _commands(root)
        for p in command.params
        if p.param_type_name == "option" and not (p.help or "").strip()
    ]
    assert not undocumented
    env = {**os.environ, "COLUMNS": "80"}
    for args in (["--help"], ["embed", "--help"], ["bench", "retrieval", "--help"], ["search", "--help"]):
        shown = subprocess.run([sys.executable, "-m", "hctembed.cli", *args], capture_output=True, text=True, env=env)
        assert shown.returncode == 0 and "…" not in shown.stdout and "<bool>" not in shown.stdout, args
        assert max(len(line) for line in shown.stdout.splitlines()) <= 80, args
    embed_help = " ".join(
        subprocess.run(
            [sys.executable, "-m", "hctembed.cli", "embed", "--help"], capture_output=True, text=True, env=env
        ).stdout.split()
    )
    assert all(name in embed_help for name in (*VIT_PRESETS, *FOREIGN_MODELS))


def test_quiet_by_default_other_libraries_only_with_verbose(db, archive, tmp_path):
    """A search prints its table and nothing else; a fresh database is created without migration messages;
    FAISS's loader lines appear only with -v."""
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "hctembed.cli", *map(str, args)], capture_output=True, text=True)

    with Store(db, read_only=True) as store:
        ids = store.resolve_collection().vectors()[2]
    plain = run("search", "--id", ids[0], "--db", db, "-k", "2")
    assert plain.returncode == 0 and plain.stderr == "", plain.stderr
    fresh = run("embed", archive, "--db", tmp_path / "new.duckdb", "--model", "vit-micro", "--workers", "0")
    assert fresh.returncode == 0 and "migrated" not in fresh.stderr and "faiss" not in fresh.stderr.lower()
    assert fresh.stderr.count("random-initialised") == 1
    verbose = run("-v", "embed", archive, "--db", tmp_path / "v.duckdb", "--model", "vit-micro", "--workers", "0")
    assert verbose.returncode == 0 and "faiss.loader: " in verbose.stderr  # other libraries' lines, with -v
