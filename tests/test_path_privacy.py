"""Folder and file names of hospital exports carry names and record numbers: none of it may reach a database,
FAISS file, manifest, JSON line, report or picture. The paths live in the locator beside the database or
manifest (and ``hctembed locate`` reads them back), where a test can find them: the check can fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import head_phantom_xyz, write_nifti
from dicom_factory import PHI, SeriesSpec, write_series
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.index.store import Store

runner = CliRunner()
NAME, MRN = "Doe_John", "MRN123456"
PLANTED = (NAME, MRN, "DOE_JOHN", "doe_john", "123456")


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout + result.stderr


@pytest.fixture
def secret(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "secret.key"
    monkeypatch.setenv("HCTEMBED_SECRET", str(path))
    return path


def _everything_written(out: Path, outputs: list[str]) -> dict[str, str]:
    """Every byte a user may share: command output, and every file under ``out`` but the locators."""
    blobs = {"command output": "\n".join(outputs)}
    for path in out.rglob("*"):
        if path.name.endswith(".locator"):
            continue
        blobs[f"name {path}"] = str(path.relative_to(out))
        if path.is_file():
            blobs[f"bytes {path.relative_to(out)}"] = path.read_bytes().decode("latin-1")
    return blobs


def _assert_nothing_planted(blobs: dict[str, str]) -> None:
    for where, text in blobs.items():
        for value in PLANTED:
            assert value not in text, f"{value!r} found in {where}"


def test_dicom_paths_reach_only_the_locator(tmp_path, secret):
    archive = tmp_path / "export"
    patient = tmp_path / "export" / f"{NAME}_{MRN}"
    for i in range(3):
        spec = SeriesSpec(n=12, seed=i, patient=dict(PHI, PatientID=f"P{i}"))
        write_series(patient / f"CT_HEAD_{NAME.upper()}_{i}", spec, names=[f"{NAME}_{k:03d}.dcm" for k in range(12)])
    write_series(patient / f"MR_{MRN}", SeriesSpec(modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4"))
    (patient / f"report_{NAME}.bin").write_bytes(b"not dicom at all")
    out = tmp_path / "out"
    db, manifest = out / "h.duckdb", out / "manifest.parquet"
    outputs = [
        invoke("scan", archive, "--out", manifest, "--json"),
        invoke("scan", archive),
        invoke("embed", manifest, "--db", db, "--model", "vit-micro", "--workers", "0", "--json"),
        invoke("embed", archive, "--db", db, "--model", "vit-micro", "--workers", "0"),
    ]
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        scan_ids = coll.vectors()[2]
        skipped = {s: row for s, row in coll.status().items() if row.status == "skipped"}
    assert len(scan_ids) == 3 and len(skipped) == 2  # the MR series and the report
    assert all(key.startswith(("se-", "fi-")) for key in skipped)
    outputs += [
        invoke("search", "--id", scan_ids[0], "--db", db, "-k", "2", "--json", "--montage", out / "m.png"),
        invoke("search", patient / f"CT_HEAD_{NAME.upper()}_1", "--db", db, "-k", "2", "--html", out / "q.html"),
        invoke("explain", "--id", scan_ids[1], "--db", db, "--out", out / "explain", "--json"),
    ]
    _assert_nothing_planted(_everything_written(out, outputs))
    # the paths are where the user can find them again: the locators (database and manifest) and `locate`
    for locator in (out / "h.duckdb.locator", out / "manifest.parquet.locator"):
        assert NAME in locator.read_bytes().decode("latin-1")
        assert oct(locator.stat().st_mode & 0o777) == "0o600"
    located = invoke("locate", scan_ids[0], *skipped, "--db", db, "--json")
    where = {row["key"]: row for row in map(json.loads, located.strip().splitlines())}
    assert set(where) == {scan_ids[0], *skipped}
    assert where[scan_ids[0]]["files"] == 12 and f"{NAME}_{MRN}/CT_HEAD_" in where[scan_ids[0]]["location"]
    assert {Path(where[k]["location"]).name for k in skipped} == {f"MR_{MRN}", f"report_{NAME}.bin"}


def test_nifti_scan_ids_are_pseudonyms_with_the_flag_and_labels_by_file_name_still_join(tmp_path, secret):
    archive = tmp_path / "export"
    rows = ["scan_id,patient_id,SDH"]
    (archive / f"{NAME}_{MRN}").mkdir(parents=True)
    for i in range(4):
        hu, affine = head_phantom_xyz(shape_xyz=(40, 40, 20), spacing=(4.0, 4.0, 8.0), seed=i)
        stem = f"{NAME}_{MRN}_{i}"
        write_nifti(archive / f"{NAME}_{MRN}" / f"{stem}.nii.gz", hu, affine)
        rows.append(f"{stem if i % 2 else stem + '.nii.gz'},p{i // 2},{i % 2}")  # by stem and by file name
    (archive / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    db = out / "h.duckdb"
    flags = ("--model", "vit-micro", "--workers", "0", "--pseudonymise-files")
    outputs = [
        invoke("scan", archive, "--json", "--pseudonymise-files"),
        invoke("embed", archive, "--db", db, *flags, "--json"),
        invoke("embed", archive, "--db", db, *flags),  # a re-run: the same pseudonyms, nothing new
    ]
    summary = next(line for line in outputs[-2].splitlines() if line.startswith("{"))
    assert json.loads(summary)["embedded"] == 4
    with Store(db, read_only=True) as store:
        scan_ids = store.resolve_collection().vectors()[2]
        labels = store.labels.of()
    assert len(scan_ids) == 4 and all(s.startswith("fi-") for s in scan_ids)
    assert sorted(labels) == sorted(scan_ids) and sorted(v["SDH"] for v in labels.values()) == [0, 0, 1, 1]
    outputs += [
        invoke("search", "--id", scan_ids[0], "--db", db, "-k", "3", "--json", "--html", out / "s.html"),
        # a labels CSV keyed by file name given to bench joins through the locator too
        invoke("bench", "retrieval", "--db", db, "--labels", archive / "labels.csv", "--out-dir", out / "b", "--json"),
        invoke("map", "--db", db, "--color-by", "SDH", "--out", out / "map.png"),
    ]
    assert '"row": "SDH", "model"' in outputs[-2]  # joined: the rows keyed by file name were scored
    _assert_nothing_planted(_everything_written(out, outputs))
    assert NAME in (out / "h.duckdb.locator").read_bytes().decode("latin-1")
