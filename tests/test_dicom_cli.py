"""DICOM archives through the CLI: scan + manifest, embed, privacy, resumable runs, public data-set layouts."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import faiss
import numpy as np
import pytest
from dicom_factory import PHI, SeriesSpec, write_series
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.index.store import Store
from hctembed.io.locator import Locator

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def secret(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "secret.key"
    monkeypatch.setenv("HCTEMBED_SECRET", str(path))
    return path


def make_archive(root: Path, *, n_series: int = 4, patient_name: str = PHI["PatientName"]) -> Path:
    for i in range(n_series):
        patient = dict(PHI, PatientName=patient_name, PatientID=f"{PHI['PatientID']}-{i // 2}")
        write_series(
            root / f"study{i}" / "series", SeriesSpec(n=12, seed=i, patient=patient, series_description="../../x")
        )
    write_series(root / "mr", SeriesSpec(modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4", patient=dict(PHI)))
    write_series(root / "short", SeriesSpec(n=5, patient=dict(PHI)))
    (root / "study0" / "series" / "notes.txt").write_text("x")
    return root


def test_scan_writes_a_manifest_and_embed_reads_it(tmp_path, secret):
    archive = make_archive(tmp_path / "archive")
    manifest = tmp_path / "out" / "manifest.parquet"
    result = invoke("scan", archive, "--out", manifest, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    decisions = sorted((r["decision"], r["reason_code"] or "") for r in rows)
    assert decisions == [("selected", "")] * 4 + [("skipped", "not_ct"), ("skipped", "too_few_slices")]
    selected = [r for r in rows if r["decision"] == "selected"]
    facts = json.loads(selected[0]["facts"])
    assert facts["modality"] == "CT" and facts["n_slices"] == 12 and facts["kvp"] == 120.0
    assert facts["slice_thickness_mm"] == 5.0 and facts["kernel"] == "Hr38" and facts["contrast"] is False
    assert secret.exists() and oct(secret.stat().st_mode & 0o777) == "0o600"
    db = tmp_path / "out" / "h.duckdb"
    result = invoke("embed", manifest, "--db", db, "--model", "vit-micro", "--workers", "0", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["embedded"], summary["skipped"], summary["failed"]) == (4, 2, 0)
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        status = coll.status()
        assert sorted(s.status for s in status.values()) == ["embedded"] * 4 + ["skipped"] * 2
        assert {s.reason.split(":")[0] for s in status.values() if s.status == "skipped"} == {
            "not_ct",
            "too_few_slices",
        }
        ids, _, scan_ids = coll.vectors()
        assert all(s.startswith("se-") for s in scan_ids)
        patients = {r.patient_id for r in coll.hits(ids.tolist()).values()}
        assert len(patients) == 2 and all(p.startswith("pt-") for p in patients)
    # the same archive embedded directly (not via the manifest) gives the same ids: pseudonyms are stable
    again = invoke("embed", archive, "--db", db, "--model", "vit-micro", "--workers", "0", "--json", "--quiet")
    assert json.loads(again.stdout.strip().splitlines()[-1])["unchanged"] == 4


TEXT_TYPES = ("VARCHAR", "JSON", "BLOB")


def _text_in_db(path: Path) -> str:
    """Every value of every column where an identifier could be stored: text, JSON and bytes (lists and
    structs of them too), never the decimal rendering of a float, whose digits can hold any number."""
    con = duckdb.connect(str(path), read_only=True)
    columns = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = 'main'"
    ).fetchall()
    parts = []
    for table, column, kind in columns:
        if any(t in kind for t in TEXT_TYPES):
            parts += [str(v) for (v,) in con.execute(f'SELECT "{column}" FROM "{table}"').fetchall()]
    con.close()
    return "\n".join(parts)


def _png_text(path: Path) -> str:
    """A PNG's text chunks (tEXt, iTXt and the compressed zTXt) as one string."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return "\n".join(f"{k}: {v}" for k, v in getattr(image, "text", {}).items())


def _planted_folders(root: Path) -> Path:
    """A series whose folder names carry the planted identifiers (as hospital exports do)."""
    folder = root / f"{PHI['PatientName'].replace('^', '_')}_{PHI['PatientID']}" / PHI["AccessionNumber"]
    write_series(folder, SeriesSpec(n=12, seed=7, patient=dict(PHI, PatientID=PHI["PatientID"] + "-9")))
    return folder


def test_no_phi_anywhere_in_outputs(tmp_path, secret):
    archive = make_archive(tmp_path / "archive", patient_name="../../x")
    # also a second archive with the plain PHI name, and folders named after the patient
    make_archive(tmp_path / "archive" / "more", n_series=2)
    _planted_folders(tmp_path / "archive" / "export")
    before = sorted(p for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    outputs = []
    for args in (
        ("scan", archive, "--out", out / "manifest.parquet", "--json"),
        ("scan", archive),
        ("embed", archive, "--db", out / "h.duckdb", "--model", "vit-micro", "--workers", "0", "--json"),
        ("embed", archive, "--db", out / "h.duckdb", "--model", "vit-micro", "--workers", "0"),
    ):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout + result.stderr)
    with Store(out / "h.duckdb", read_only=True) as store:
        scan_id = store.resolve_collection().vectors()[2][0]
    for args in (
        ("search", "--id", scan_id, "--db", out / "h.duckdb", "--json", "--montage", out / "by-id.png"),
        ("search", archive / "study1" / "series", "--db", out / "h.duckdb", "--html", out / "by-file.html"),
    ):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        outputs.append(result.stdout + result.stderr)
    planted = [*PHI.values(), "ZEBULON", "QUARTZ", "99887766", "5544332211"]
    locators = {out / "h.duckdb.locator", out / "manifest.parquet.locator"}
    # the search can fail: the locators (paths, kept apart on purpose) hold the planted folder names
    for path in locators:
        with Locator(path, read_only=True) as locator:
            paths = "\n".join(f"{e.root}/{e.location}\n" + "\n".join(e.files) for e in locator.all())
        assert PHI["PatientID"] in paths and PHI["AccessionNumber"] in paths, path
    blobs = {"cli output": "\n".join(outputs), "database text": _text_in_db(out / "h.duckdb")}
    for path in out.rglob("*"):
        blobs[f"name {path}"] = path.name
        if path.is_file() and path not in locators:
            blobs[f"bytes {path.name}"] = path.read_bytes().decode("latin-1")
            if path.suffix == ".png":
                blobs[f"text chunks {path.name}"] = _png_text(path)
    assert "text chunks by-id.png" in blobs
    assert "se-" in blobs["database text"]  # pseudonymous ids are there: the text was read
    for where, text in blobs.items():
        for value in planted:
            assert value not in text, f"{value!r} found in {where}"
    # nothing written outside the output folder (the '../../x' description and name went nowhere)
    after = sorted(p for p in tmp_path.rglob("*") if not p.is_relative_to(out) and p != secret)
    assert after == [p for p in before if p != secret]
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "x").exists()


def test_second_writer_gets_a_clear_message(tmp_path, secret):
    db = tmp_path / "h.duckdb"
    Store(db).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb,sys; c=duckdb.connect({str(db)!r}); print('ready', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        archive = make_archive(tmp_path / "a", n_series=1)
        result = invoke("embed", archive, "--db", db, "--model", "vit-micro", "--workers", "0")
        assert result.exit_code == 2
        assert "open for writing by another process" in result.stderr
        assert "Traceback" not in result.output
    finally:
        holder.communicate("\n", timeout=30)


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, HCTEMBED_SECRET=str(tmp_path / "secret.key"))
    archive = tmp_path / "archive"
    for i in range(10):
        write_series(archive / f"s{i}", SeriesSpec(n=12, seed=i, patient=dict(PHI, PatientID=f"P{i}")))
    # one series that is skipped at selection and one that fails when its pixels are read
    write_series(archive / "mr", SeriesSpec(modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4"))
    bad = write_series(archive / "s5b", SeriesSpec(n=12, seed=50, patient=dict(PHI, PatientID="P50")))
    bad[6].write_bytes(bad[6].read_bytes()[:-2000])
    cmd = [
        sys.executable,
        "-m",
        "hctembed.cli",
        "embed",
        str(archive),
        "--model",
        "vit-micro",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--quiet",
        "--checkpoint-seconds",
        "0",
        "--db",
    ]
    subprocess.run([*cmd, str(tmp_path / "straight.duckdb")], env=env, check=True, capture_output=True)
    db = tmp_path / "killed.duckdb"
    proc = subprocess.Popen([*cmd, str(db)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = set(), time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if db.exists():
            seen.add(db.stat().st_mtime_ns)  # with --checkpoint-seconds 0 every batch rewrites the file
        if len(seen) >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Store(db, read_only=True) as store:
        partial = store.resolve_collection().count()
    assert 0 < partial < 10, f"the kill landed outside the run ({partial} rows)"
    subprocess.run([*cmd, str(db)], env=env, check=True, capture_output=True)
    with Store(tmp_path / "straight.duckdb", read_only=True) as a, Store(db, read_only=True) as b:
        ca, cb = a.resolve_collection(), b.resolve_collection()
        _, xa, scans_a = ca.vectors()
        ids_b, xb, scans_b = cb.vectors()
        assert ca.model_id == cb.model_id
        assert sorted(scans_a) == sorted(scans_b) and len(scans_b) == 10
        order_a, order_b = np.argsort(scans_a), np.argsort(scans_b)
        np.testing.assert_allclose(xa[order_a], xb[order_b], atol=1e-6)
        assert len(set(ids_b.tolist())) == len(ids_b)
        # the whole status table, attempts included, is what an uninterrupted run leaves
        assert ca.status() == cb.status()
        assert sorted(s.status for s in cb.status().values()) == ["embedded"] * 10 + ["failed", "skipped"]
        index = faiss.read_index(str(cb.index_files()[0]))
        assert index.ntotal == len(ids_b)


def _rsna_layout(root: Path) -> dict[str, dict[str, int]]:
    """Two series of per-slice files named ID_<image>.dcm, and stage_2_train.csv rows per image and subtype."""
    folder = root / "stage_2_train"
    truth = {}
    rows = []
    for s, positive_slices in enumerate(([], [3, 4])):
        names = [f"ID_{s:02d}{k:03d}abc.dcm" for k in range(12)]
        write_series(folder, SeriesSpec(n=12, seed=s, patient=dict(PHI, PatientID=f"RSNA{s}")), names=names)
        for k, name in enumerate(names):
            image = name[:-4]
            for subtype in ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"):
                positive = k in positive_slices and subtype in ("subdural", "any")
                rows.append((f"{image}_{subtype}", int(positive)))
        truth[f"RSNA{s}"] = {"SDH": int(bool(positive_slices)), "any": int(bool(positive_slices)), "EDH": 0}
    with open(root / "stage_2_train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Label"])
        writer.writerows(rows)
    return truth


def test_rsna_layout_gives_series_labels_that_embed_ids_match(tmp_path, secret):
    root = tmp_path / "rsna"
    _rsna_layout(root)
    labels = tmp_path / "rsna_labels.csv"
    result = invoke("datasets", "rsna", root, "--out", labels)
    assert result.exit_code == 0, result.output
    with open(labels) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert sorted((r["SDH"], r["any"], r["EDH"]) for r in rows) == [("0", "0", "0"), ("1", "1", "0")]
    db = tmp_path / "r.duckdb"
    result = invoke("embed", root, "--db", db, "--model", "vit-micro", "--workers", "0", "--labels", labels, "--quiet")
    assert result.exit_code == 0, result.output
    with Store(db, read_only=True) as store:
        assert set(store.labels.of()) == {r["scan_id"] for r in rows}


def test_cq500_layout_majority_vote(tmp_path, secret):
    root = tmp_path / "cq500"
    for n in (1, 2):
        for series, thickness in (("CT 5mm", 5.0), ("CT Plain THIN", 2.5)):
            write_series(
                root / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study" / series,
                SeriesSpec(
                    n=12, thickness=thickness, step=thickness, seed=n, patient=dict(PHI, PatientID=f"CQ500-CT-{n}")
                ),
            )
    header = ["name", "Category"] + [f"R{r}:{c}" for r in (1, 2, 3) for c in ("ICH", "IPH", "SDH")]
    votes = {
        1: {"ICH": (1, 1, 0), "IPH": (1, 0, 0), "SDH": (0, 0, 0)},
        2: {"ICH": (1, 1, 1), "IPH": (0, 1, 1), "SDH": (1, 0, 1)},
    }
    with open(root / "reads.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for n, v in votes.items():
            writer.writerow([f"CQ500-CT-{n}", "B1"] + [v[c][r - 1] for r in (1, 2, 3) for c in ("ICH", "IPH", "SDH")])
    labels = tmp_path / "cq.csv"
    result = invoke("datasets", "cq500", root, "--out", labels)
    assert result.exit_code == 0, result.output
    with open(labels) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # two series per patient
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add((r["ICH"], r["IPH"], r["SDH"]))
    assert sorted(tuple(sorted(v)) for v in by_patient.values()) == [(("1", "0", "0"),), (("1", "1", "1"),)]
