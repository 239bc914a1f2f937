"""One labels reader for every command: Excel's BOM, padded headers, short rows, Latin-1 bytes, NA cells; no label
column dropped without a warning that names it, and a one-line error naming the row and column where a named
label cannot be read."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hctembed.errors import InputError
from hctembed.io.labels import read_labels


def _write(tmp_path, text: str, *, encoding="utf-8", name="labels.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_excel_bom_spaced_headers_na_cells_and_words(tmp_path):
    text = "scan_id, patient_id ,EDH, SAH \ns1,p1,0,yes\ns2,p1,1,NA\ns3,p2,,nan\ns4,p3,0,No\n"
    table = read_labels(_write(tmp_path, text, encoding="utf-8-sig"))
    assert table.scan_ids == ["s1", "s2", "s3", "s4"] and table.names == ["EDH", "SAH"]
    assert table.patient_ids == ["p1", "p1", "p2", "p3"]  # " patient_id " is patient_id
    expected = np.array([[0, 1], [1, np.nan], [np.nan, np.nan], [0, 0]])
    np.testing.assert_array_equal(table.values, expected)


def test_a_column_that_cannot_be_read_is_named_in_a_warning_not_dropped_silently(tmp_path, caplog):
    text = "scan_id,EDH,SAH,IVH,site\ns1,0,2,0,A\ns2,1,1,-1,B\ns3,0,0,,C\n"
    with caplog.at_level(logging.WARNING, logger="hctembed"):
        table = read_labels(_write(tmp_path, text))
    assert table.names == ["EDH"]
    warned = caplog.text
    assert "'SAH' left out: row 2 holds '2'" in warned and "'IVH' left out: row 3 holds '-1'" in warned
    assert "'site' left out" in warned
    with pytest.raises(InputError, match=r"row 2, column 'SAH': '2' is not 0/1"):
        read_labels(_write(tmp_path, text), columns=["EDH", "SAH"])
    with pytest.raises(InputError, match=r"no column\(s\) \['ICH'\]"):
        read_labels(_write(tmp_path, text), columns=["ICH"])


def test_short_rows_latin1_and_malformed_files(tmp_path, caplog):
    short = read_labels(_write(tmp_path, "scan_id,patient_id,EDH,SAH\ns1,p1,1\ns2\n"))
    assert short.names == ["EDH"]  # SAH: every cell missing (left out, with a warning)
    np.testing.assert_array_equal(short.values, [[1], [np.nan]])
    assert short.patient_ids == ["p1", None]
    with caplog.at_level(logging.WARNING, logger="hctembed"):
        latin = read_labels(_write(tmp_path, "scan_id,EDH\nsé1,1\n", encoding="latin-1"))
    assert latin.scan_ids == ["sé1"] and "not UTF-8" in caplog.text
    odd = read_labels(_write(tmp_path, "scan_id,note,EDH\ns1,wait\x85 see,1\ns2,x,0\n", encoding="latin-1"))
    assert odd.scan_ids == ["s1", "s2"] and odd.values[:, 0].tolist() == [1.0, 0.0]  # a cp1252 "…" ends no row
    with pytest.raises(InputError, match="row 3 has 4 cells but the header names 2"):
        read_labels(_write(tmp_path, "scan_id,EDH\ns1,1\ns2,1,0,0\n"))
    with pytest.raises(InputError, match="row 3 has no scan_id"):
        read_labels(_write(tmp_path, "scan_id,EDH\ns1,1\n,1\n"))
    with pytest.raises(InputError, match="'EDH' is named twice"):
        read_labels(_write(tmp_path, "scan_id,EDH,EDH\ns1,1,1\n"))
    with pytest.raises(InputError, match="no scan_id column"):
        read_labels(_write(tmp_path, "id,EDH\ns1,1\n"))


def test_bench_warns_about_a_dropped_column_and_finetune_names_the_bad_cell(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hctembed.cli.app import app

    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    runner = CliRunner()
    archive = tmp_path / "archive"
    assert runner.invoke(app, ["synth", str(archive), "--n", "8", "--matrix", "48", "--quiet"]).exit_code == 0
    db = tmp_path / "h.duckdb"
    result = runner.invoke(app, ["embed", str(archive), "--db", str(db), "--model", "vit-micro", "--workers", "0"])
    assert result.exit_code == 0, result.output
    lines = (archive / "labels.csv").read_text().splitlines()
    header = lines[0].split(",")
    sah = header.index("SAH")
    bad_row = lines[1].split(",")
    bad_row[sah] = "2"
    labels = tmp_path / "bad.csv"
    labels.write_text("\ufeff" + "\n".join([lines[0], ",".join(bad_row), *lines[2:]]) + "\n")
    result = runner.invoke(app, ["bench", "retrieval", "--db", str(db), "--labels", str(labels), "--json"])
    assert result.exit_code == 0, result.output
    assert "'SAH' left out: row 2 holds '2'" in result.stderr
    assert "SAH" not in {line.split('"label": "')[1].split('"')[0] for line in result.stdout.splitlines()}
    result = runner.invoke(
        app, ["finetune", str(archive), "--labels", str(labels), "--task", "SAH", "--out", str(tmp_path / "ft"),
              "--model", "vit-micro", "--scratch", "--max-steps", "1"],
    )  # fmt: skip
    assert result.exit_code == 2 and "row 2, column 'SAH'" in result.stderr, result.output
    assert "Traceback" not in result.output
