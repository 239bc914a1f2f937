"""Search montages and the offline HTML page, and the CLI (explain --db, search --montage/--html, map) on a
small synthetic archive embedded with vit-micro."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.index.store import Store
from hctembed.panels import search_panels
from hctembed.pictures.montage import PanelPlanes, render_montage
from hctembed.search import search_id, stored_encoder

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    assert invoke("synth", root, "--n", "6", "--seed", "2", "--matrix", "64", "--quiet").exit_code == 0
    return root


@pytest.fixture(scope="module")
def db(archive, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("db") / "h.duckdb"
    result = invoke("embed", archive, "--db", path, "--model", "vit-micro", "--workers", "0", "--quiet")
    assert result.exit_code == 0, result.output
    return path


def stored_ids(db) -> list[str]:
    with Store(db, read_only=True) as store:
        return store.resolve_collection().vectors()[2]


def test_montage_png_shows_every_scan(db):
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        query = coll.vectors()[2][0]
        hits = search_id(store, scan_id=query, k=3)
        encoder = stored_encoder(coll)
        panels = search_panels(coll, encoder, hits, query_scan_id=query)
    assert [p.scan_id for p in panels] == [query] + [h.scan_id for h in hits]
    assert all(p.missing is None and p.planes is not None for p in panels)  # stored at embedding time
    assert f"cosine {hits[0].score:.4f}" in panels[1].caption()
    boxes = render_montage(panels, out=Path(db).parent / "m.png", windows=encoder.preprocess.windows)
    png = imread(Path(db).parent / "m.png")
    assert png.shape[:2] == (240 * 4 + 160, 240 * 4)
    for c in range(4):
        for row in ("mid axial", "mid coronal", "mid sagittal", "most attended"):
            left, top, right, bottom = boxes[f"{c}/{row}"]
            crop = png[top + 2 : bottom - 2, left + 2 : right - 2, :3].mean(-1)
            assert crop.std() > 0.15, (c, row)  # anatomy in the brain window, not blank


def test_stored_planes_are_what_the_files_show_and_need_no_file(db, archive, tmp_path):
    """The planes stored by embed equal those made from the scan file now (to their uint8 step), and a
    montage needs no file once they are stored."""
    from hctembed.panels import scan_panel

    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        encoder = stored_encoder(coll)
        ids = coll.vectors()[2]
        stored = coll.planes(ids)
        paths = {r.scan_id: r.path for r in coll.hits(coll.ids().tolist()).values()}
    assert set(stored) == set(ids) and max(len(b) for b in stored.values()) < 20_000
    for scan_id in ids:
        mine = PanelPlanes.from_bytes(stored[scan_id])
        fresh = scan_panel(encoder, paths[scan_id], title="", scan_id=scan_id).shown()
        assert mine.peak == fresh.peak, scan_id
        for a, b in [*zip(mine.mid.values(), fresh.mid.values(), strict=True), (mine.attended, fresh.attended)]:
            assert np.abs(a - b).max() <= 0.5 / 255 + 1e-6
        assert np.abs(mine.strength - fresh.strength).max() <= 0.5 / 255 + 1e-4
    moved = tmp_path / "elsewhere"
    shutil.copytree(archive, moved)
    shutil.rmtree(archive)
    try:
        result = invoke("search", "--id", ids[0], "--db", db, "-k", "3", "--montage", tmp_path / "m.png")
        assert result.exit_code == 0 and "not found" not in result.stderr, result.output
        assert imread(tmp_path / "m.png").shape[:2] == (240 * 4 + 160, 240 * 4)
    finally:
        shutil.copytree(moved, archive)


def test_cli_search_montage_and_html(db, archive, tmp_path):
    ids = stored_ids(db)
    png, page = tmp_path / "m.png", tmp_path / "m.html"
    result = invoke("search", "--id", ids[1], "--db", db, "-k", "4", "--json", "--montage", png, "--html", page)
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert imread(png).shape[:2] == (240 * 4 + 160, 240 * 5)
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and "url(" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert len(sources) == 5 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for s in sources)
    for h in hits:
        assert h["scan_id"] in text and f"cosine {h['score']:.4f}" in text
    # by a query file, with one neighbour's file gone and no planes stored for it (a database written before
    # they were): a placeholder, not a crash
    import duckdb

    con = duckdb.connect(str(db))
    con.execute("DELETE FROM scan_planes WHERE scan_id = ?", [hits[0]["scan_id"]])
    con.close()
    victim = archive / f"{hits[0]['scan_id']}.nii.gz"
    moved = tmp_path / victim.name
    shutil.move(victim, moved)
    try:
        query = archive / f"{ids[1]}.nii.gz"
        again = invoke("search", query, "--db", db, "-k", "3", "--montage", tmp_path / "m2.png", "--html", page)
    finally:
        shutil.move(moved, victim)
    assert again.exit_code == 0, again.output
    text = page.read_text()
    assert "no longer where the locator says" in text and str(tmp_path) not in text and "query file" in text
    assert imread(tmp_path / "m2.png").shape[:2] == (1120, 960)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_html_renders_offline_in_headless_chromium(db, tmp_path):
    page, shot = tmp_path / "page.html", tmp_path / "shot.png"
    result = invoke("search", "--id", stored_ids(db)[0], "--db", db, "-k", "3", "--html", page, "--quiet")
    assert result.exit_code == 0, result.output
    cmd = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}", "--window-size=1200,800", page.resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=180, check=False, cwd=tmp_path)
    assert shot.exists(), "chromium wrote no screenshot"
    img = imread(shot)[..., :3]
    assert img.shape[:2] == (800, 1200)
    assert img.std() > 0.1  # the page's scans, not a blank page
    grey = img.mean(-1)
    assert (grey > 0.8).mean() > 0.01 and (grey < 0.2).mean() > 0.2  # bright skull and text on the dark page


def test_cli_explain_with_the_stored_model(db, archive, tmp_path):
    scan = archive / f"{stored_ids(db)[0]}.nii.gz"
    result = invoke("explain", scan, "--db", db, "--out", tmp_path, "--json", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    with Store(db, read_only=True) as store:
        assert summary["model_id"] == store.resolve_collection().model_id
    assert imread(tmp_path / "attention_rollout.png").shape[:2] == (1300, 1200)
    assert json.loads((tmp_path / "attention_distance.json").read_text())["grid"] == 6


def test_cli_map_by_label_and_protocol(db, archive, tmp_path):
    labels = archive / "labels.csv"
    import csv

    rows = list(csv.DictReader(labels.open()))
    result = invoke("map", "--db", db, "--color-by", "manufacturer", "--labels", labels, "--out", tmp_path / "a.png",
                    "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert len(summary["legend"]) == len({r["manufacturer"] for r in rows}) and summary["scans"] == 6
    assert imread(tmp_path / "a.png").shape[:2] == (800, 1000)
    thick = invoke("map", "--db", db, "--color-by", "slice_thickness", "--labels", labels, "--out", tmp_path / "b.png",
                   "--json")  # fmt: skip
    assert len(json.loads(thick.stdout)["legend"]) == len({float(r["slice_thickness_mm"]) for r in rows})
    bad = invoke("map", "--db", db, "--color-by", "nope", "--out", tmp_path / "c.png")
    assert bad.exit_code == 2 and "available" in bad.stderr
    assert np.isfinite(imread(tmp_path / "b.png")).all()


def test_a_query_file_is_drawn_from_itself_not_from_a_stored_scan_of_its_name(db, archive, tmp_path):
    """Another scan saved under a stored scan's name (a follow-up, another site's ct001.nii.gz) is the query."""
    ids = stored_ids(db)
    impostor = tmp_path / f"{ids[0]}.nii.gz"
    shutil.copy(archive / f"{ids[1]}.nii.gz", impostor)
    with Store(db, read_only=True) as store:
        coll = store.resolve_collection()
        encoder = stored_encoder(coll)
        hits = search_id(store, scan_id=ids[0], k=2)
        panels = search_panels(coll, encoder, hits, query_path=impostor)
        stored = PanelPlanes.from_bytes(coll.planes([ids[1]])[ids[1]])
    query = panels[0]
    assert query.planes is None and query.image is not None  # made from the file now
    assert np.abs(query.shown().mid["axial"] - stored.mid["axial"]).max() <= 0.5 / 255 + 1e-6  # it is ids[1]
