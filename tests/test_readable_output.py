"""What a person reads in an 80-column terminal: every --help page, the tables of `models`, `scan`, `embed` and
`search`, and the runs that did nothing (their exit status)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer.main
from dicom_factory import SeriesSpec, write_series
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.cli.common import distinct_decimals
from hctembed.index.store import Store

runner = CliRunner()
COLUMNS = {"COLUMNS": "80"}


def invoke(*args, env=COLUMNS):
    return runner.invoke(app, [str(a) for a in args], env=env, prog_name="hctembed")


def _command_paths(group, prefix=()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in sorted(getattr(group, "commands", {}).items()):
        paths += _command_paths(command, (*prefix, name))
    return paths


COMMANDS = _command_paths(typer.main.get_command(app))


def test_every_command_is_reached():
    names = {" ".join(p) for p in COMMANDS}
    assert {"", "embed", "search", "scan", "bench retrieval", "models pull", "probe train", "serve"} <= names
    assert len(COMMANDS) > 25


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "hctembed")
def test_help_fits_80_columns_with_plain_placeholders_and_whole_summaries(path):
    result = invoke(*path, "--help")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    # placeholders as a shell user reads them, not Python types or typer's braces
    assert not re.search(r"<(path|str|int|float|bool|list|tuple)|list\[|\{[a-z_]+\}", text), text
    usage = text.splitlines()[0]
    assert usage.startswith("Usage: hctembed"), usage
    # command summaries whole: none cut after a word with "..." (click's cut), as "subtypes..." was
    commands = text.split("Commands:")[1] if "Commands:" in text else ""
    assert not re.search(r"[A-Za-z,;)]\.\.\.$", commands, flags=re.MULTILINE), commands


def test_search_help_says_a_dicom_folder_is_a_query_and_max_voxels_its_default_once():
    text = invoke("search", "--help").stdout
    assert "DICOM" in text
    embed = " ".join(invoke("embed", "--help").stdout.split())
    assert embed.count("1024 x 1024 x 2000") == 1 and "2097152000" not in embed


def _words_whole(table_text: str, values) -> None:
    """Each value (an id, a word) appears on one line of the output, unbroken."""
    for value in values:
        assert value in table_text, f"{value!r} cut or broken in:\n{table_text}"


def test_models_table_breaks_no_word_at_80_columns():
    result = invoke("models")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in invoke("models", "--json").stdout.splitlines()]
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    words = {w for r in rows for key in ("model", "architecture", "licence", "weights") for w in str(r[key]).split()}
    _words_whole(result.stdout, words | {"architecture", "licence", "weights"})


def test_a_wide_table_still_fits_at_200_columns():
    result = invoke("models", env={"COLUMNS": "200"})
    assert "┃ model" in result.stdout  # a table, not the one-block-per-row layout


@pytest.fixture
def dicom_archive(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    root = tmp_path / "archive"
    for i in range(3):
        write_series(root / f"s{i}", SeriesSpec(n=12, seed=i))
    write_series(root / "mr", SeriesSpec(modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4"))
    return root


def test_scan_ids_in_tables_can_be_copied_into_search(dicom_archive, tmp_path):
    rows = [json.loads(line) for line in invoke("scan", dicom_archive, "--json", "--quiet").stdout.splitlines()]
    table = invoke("scan", dicom_archive, "--quiet").stdout
    assert all(len(line) <= 80 for line in table.splitlines())
    _words_whole(table, [r["scan_id"] for r in rows if r["scan_id"]] + [r["source"] for r in rows])
    assert "…" not in table
    db = tmp_path / "h.duckdb"
    result = invoke("embed", dicom_archive, "--db", db, "--model", "vit-micro", "--workers", "0")
    assert result.exit_code == 0, result.output
    # a table, or "field  value" lines where the database's path is too long for a table at 80 columns
    assert re.search(r"seconds\s+│? ?\d+\.\d\b(?!\d)", result.stdout), result.stdout  # not 175.4600
    assert re.search(r"on disk: h\.duckdb\s+│? ?[\d.]+ [kM]?B", result.stdout), result.stdout
    with Store(db, read_only=True) as store:
        scan_id = store.resolve_collection().vectors()[2][0]
    found = invoke("search", "--id", scan_id, "--db", db, "-k", "2")
    assert found.exit_code == 0, found.output
    _words_whole(found.stdout, [scan_id])
    copied = re.findall(r"se-[0-9a-f]+", found.stdout)
    assert copied and all(invoke("search", "--id", s, "--db", db, "-k", "1").exit_code == 0 for s in copied)


def test_scores_get_the_decimals_that_order_them():
    assert distinct_decimals([0.99971, 0.99974, 0.99972]) == 5
    assert distinct_decimals([0.5, 0.25]) == 4
    assert distinct_decimals([0.9999991, 0.9999992]) == 7
    assert distinct_decimals([0.1, 0.1]) == 4  # equal values stay equal
    assert distinct_decimals([1.0, 1.0 - 1e-12]) == 8  # as many as it may


def test_runs_that_embedded_nothing_exit_3_and_create_no_database(tmp_path, monkeypatch):
    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    notes = tmp_path / "notes.txt"
    notes.write_text("not a scan")
    db = tmp_path / "x.duckdb"
    result = invoke("embed", notes, "--db", db, "--model", "vit-micro")
    assert result.exit_code == 3, result.output
    assert "nothing to embed" in result.stderr and not list(tmp_path.glob("x.duckdb*"))
    # every candidate bad: the reasons are recorded and printed, and the exit status says nothing was embedded
    bad = tmp_path / "allbad"
    write_series(bad / "mr", SeriesSpec(modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4"))
    write_series(bad / "short", SeriesSpec(n=4))
    (bad / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    result = invoke("embed", bad, "--db", db, "--model", "vit-micro", "--workers", "0", "--json")
    assert result.exit_code == 3, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["embedded"] == 0 and summary["nothing_embedded"].startswith("nothing embedded")
    assert {s["code"] for s in summary["skips"]} == {"not_ct", "too_few_slices"} and summary["failed"] == 1
    # an up-to-date re-run of a good archive is not "nothing": exit 0
    good = tmp_path / "good"
    write_series(good / "s", SeriesSpec(n=12))
    for _ in range(2):
        result = invoke("embed", good, "--db", tmp_path / "g.duckdb", "--model", "vit-micro", "--workers", "0")
        assert result.exit_code == 0, result.output


def test_options_are_checked_before_the_archive_is_walked(tmp_path):
    archive = tmp_path / "a"
    archive.mkdir()
    (archive / "notes.txt").write_text("x")
    result = invoke("embed", archive, "--db", tmp_path / "h.duckdb", "--model", "nope")
    assert result.exit_code == 2 and "unknown model 'nope'" in result.stderr
    assert "non-image" not in result.stderr  # the walk did not start
    result = invoke("embed", archive, "--db", tmp_path / "h.duckdb", "--model", "vit-micro", "--labels", "nope.csv")
    assert result.exit_code == 2 and "--labels nope.csv: not found" in result.stderr
    assert "Errno" not in result.stderr and not (tmp_path / "h.duckdb").exists()


def test_comma_lists_of_numbers_are_read_or_refused_in_one_line():
    from hctembed.cli.common import parse_numbers, parse_ratios

    assert parse_ratios("0.7,0.2,0.1") == (0.7, 0.2, 0.1)
    assert parse_numbers("96,192", option="--pair-crop-mm", names=("LO", "HI")) == (96.0, 192.0)
    for text in ("0.8,0.2", "a,b,c", "0.5,0.25,0.25,0"):
        with pytest.raises(typer.BadParameter, match=r"--ratios needs 3 numbers \(train,val,test\)"):
            parse_ratios(text)
    with pytest.raises(typer.BadParameter, match=r"--pair-crop-mm needs 2 numbers \(LO,HI\), got '96'"):
        parse_numbers("96", option="--pair-crop-mm", names=("LO", "HI"))
