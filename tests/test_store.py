"""DuckDB store and FAISS index: round trips, ids, migrations, rebuilds, mismatches, locking."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import duckdb
import faiss
import numpy as np
import pytest

from hctembed.index.store import (
    SCHEMA_VERSION,
    HitRow,
    ModelMismatchError,
    ModelRow,
    ScanRow,
    StatusRow,
    Store,
    StoreError,
)
from hctembed.index.vectors import build_index, open_index
from hctembed.io.locator import Location


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "t.duckdb") as s:
        s.models.register(
            ModelRow(model_id="m-1", name="vit-micro", dim=8, config={}, weights_path=None, weights_digest="d1")
        )
        yield s


def test_schema_is_versioned(tmp_path):
    path = tmp_path / "v.duckdb"
    with Store(path) as s:
        assert s.schema_version() == SCHEMA_VERSION
    with Store(path) as s:  # reopening migrates nothing twice
        assert s.db.one("SELECT count(*) FROM schema_version")[0] == SCHEMA_VERSION
    con = duckdb.connect(str(path))
    con.execute("INSERT INTO schema_version (version) VALUES (99)")
    con.close()
    with pytest.raises(StoreError, match="newer"):
        Store(path)


def test_vectors_round_trip_and_ids_are_monotonic(store):
    rng = np.random.default_rng(0)
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    x = _unit(rng, 5, 8)
    ids = coll.add(scan_ids=[f"s{i}" for i in range(5)], vectors=x)
    assert ids.dtype == np.int64 and list(ids) == sorted(ids) and len(set(ids)) == 5
    got_ids, got_x, got_scans = coll.vectors()
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_x, x)
    assert got_scans == [f"s{i}" for i in range(5)]
    # re-embedding a scan replaces its vector with a new, larger id; old ids are never reused
    new = coll.add(scan_ids=["s1"], vectors=x[:1])
    assert new[0] > ids.max()
    assert coll.count() == 5
    assert coll.vector_of("s1")[0] == new[0]
    # a second collection draws from the same sequence
    other = store.collection(model_id="m-1", fingerprint="pp-b", dim=8)
    assert other.add(scan_ids=["s0"], vectors=x[:1])[0] > new[0]


def test_duckdb_array_inner_product_matches_numpy(store):
    rng = np.random.default_rng(1)
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    x = _unit(rng, 20, 8)
    ids = coll.add(scan_ids=[f"s{i}" for i in range(20)], vectors=x)
    q = x[3]
    rows = store.db.rows(
        f"SELECT id, array_inner_product(vector, ?::FLOAT[8]) AS s FROM {coll.table} ORDER BY s DESC LIMIT 5",
        [q.tolist()],
    )
    order = np.argsort(-(x @ q))[:5]
    assert [r[0] for r in rows] == ids[order].tolist()
    np.testing.assert_allclose([r[1] for r in rows], (x @ q)[order], rtol=1e-5)


def test_faiss_matches_brute_force(store):
    rng = np.random.default_rng(2)
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    x = _unit(rng, 200, 8)
    ids = coll.add(scan_ids=[f"s{i}" for i in range(200)], vectors=x)
    index = open_index(coll)
    xq = _unit(rng, 7, 8)
    result = index.search(xq, k=10, model_id="m-1", fingerprint="pp-a")
    scores = xq @ x.T
    for qi in range(7):
        order = np.argsort(-scores[qi])[:10]
        np.testing.assert_array_equal(result.I[qi], ids[order])
        np.testing.assert_allclose(result.D[qi], scores[qi, order], rtol=1e-5, atol=1e-6)


def test_query_from_another_model_is_refused(store):
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    coll.add(scan_ids=["s0"], vectors=np.ones((1, 8), np.float32))
    index = open_index(coll)
    with pytest.raises(ModelMismatchError, match=r"model m-2 / preprocessing pp-a.*model m-1 / preprocessing pp-a"):
        index.search(np.ones((1, 8)), k=1, model_id="m-2", fingerprint="pp-a")
    with pytest.raises(ModelMismatchError, match="pp-z"):
        index.search(np.ones((1, 8)), k=1, model_id="m-1", fingerprint="pp-z")
    with pytest.raises(ModelMismatchError, match="dim 4"):
        index.search(np.ones((1, 4)), k=1, model_id="m-1", fingerprint="pp-a")
    with pytest.raises(ModelMismatchError, match="stored: m-1 / pp-a"):
        store.collection(model_id="m-2", fingerprint="pp-a")
    with pytest.raises(ModelMismatchError):
        coll.add(scan_ids=["s1"], vectors=np.ones((1, 4), np.float32))


@pytest.mark.parametrize("damage", ["delete", "truncate", "garbage", "stale", "manifest"])
def test_index_is_rebuilt_from_duckdb(store, damage, caplog):
    rng = np.random.default_rng(3)
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    x = _unit(rng, 30, 8)
    coll.add(scan_ids=[f"s{i}" for i in range(30)], vectors=x)
    open_index(coll)
    index_path, manifest_path = coll.index_files()
    assert index_path.exists() and manifest_path.exists()
    if damage == "delete":
        index_path.unlink()
    elif damage == "truncate":
        index_path.write_bytes(index_path.read_bytes()[:100])
    elif damage == "garbage":
        index_path.write_bytes(b"\x00" * 500)
    elif damage == "stale":
        coll.add(scan_ids=["extra"], vectors=x[:1])
    else:
        manifest_path.write_text("{not json")
    index = open_index(coll)
    ids = coll.ids()
    assert index.ntotal == len(ids)
    faiss_ids = faiss.vector_to_array(index.index.id_map)
    np.testing.assert_array_equal(np.sort(faiss_ids), ids)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["ntotal"] == len(ids) and manifest["model_id"] == "m-1" and manifest["fingerprint"] == "pp-a"
    assert manifest["dim"] == 8 and manifest["metric"] == "inner_product"
    assert "rebuilding" in caplog.text or damage == "delete"
    assert not list(index_path.parent.glob("*.tmp"))  # atomic writes leave nothing behind


def test_valid_index_is_reused_not_rebuilt(store, caplog):
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    coll.add(scan_ids=["a", "b"], vectors=np.eye(2, 8, dtype=np.float32))
    open_index(coll)
    index_path, _ = coll.index_files()
    before = index_path.stat().st_mtime_ns
    caplog.clear()
    open_index(coll)
    assert index_path.stat().st_mtime_ns == before
    assert "rebuilding" not in caplog.text


def test_build_index_on_empty_collection():
    index = build_index(np.zeros(0, np.int64), np.zeros((0, 8), np.float32), model_id="m", fingerprint="f")
    assert index.ntotal == 0
    result = index.search(np.ones((1, 8)), k=3, model_id="m", fingerprint="f")
    assert (result.I == -1).all()


def test_labels_status_and_scans(store):
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    store.scans.upsert([ScanRow(scan_id="s0", patient_id=None, format="nifti", meta={"a": 1})])
    store.scans.set_patients({"s0": "p0"})
    store.labels.set([("s0", "EDH", 1.0), ("s0", "SDH", 0.0)], origin="labels.csv")
    store.labels.set([("s0", "EDH", 0.0)], origin="labels.csv")  # replaced, not duplicated
    assert store.labels.of(["s0"]) == {"s0": {"EDH": 0.0, "SDH": 0.0}}
    for _ in range(2):
        coll.record_statuses(
            [StatusRow(source="bad.nii", scan_id=None, status="failed", reason="boom", file_size=1, file_mtime_ns=2)]
        )
    row = coll.status()["bad.nii"]
    assert (row.status, row.reason, row.attempts) == ("failed", "boom", 2)
    with pytest.raises(ValueError, match="twice"):
        coll.record_statuses([StatusRow(source="x", scan_id=None, status="failed")] * 2)
    ids = coll.add(scan_ids=["s0"], vectors=np.ones((1, 8), np.float32))
    assert coll.hits(ids.tolist())[int(ids[0])] == HitRow(id=int(ids[0]), scan_id="s0", patient_id="p0", path=None)


def test_failed_transaction_keeps_what_was_stored(store):
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    coll.add(scan_ids=["keep"], vectors=np.ones((1, 8), np.float32))
    with pytest.raises(RuntimeError), store.transaction():
        coll.add(scan_ids=["lost"], vectors=np.ones((1, 8), np.float32))
        raise RuntimeError("crash mid-batch")
    assert coll.vectors()[2] == ["keep"]


def test_second_writer_gets_a_clear_message(tmp_path):
    path = tmp_path / "locked.duckdb"
    Store(path).close()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import duckdb, sys, time
            con = duckdb.connect({str(path)!r})
            print("ready", flush=True)
            sys.stdin.readline()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match="open for writing by another process"):
            Store(path)
    finally:
        holder.communicate("\n", timeout=30)


def test_read_only_open_of_missing_db_is_clear(tmp_path):
    with pytest.raises(StoreError, match="no database"):
        Store(tmp_path / "none.duckdb", read_only=True)


def test_version_1_database_is_migrated_in_place(tmp_path):
    """A file written by schema v1 gains v2's column and keeps its rows."""
    from hctembed.index.store.migrations import MIGRATIONS

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP)")
    for statement in MIGRATIONS[1]:
        con.execute(statement)
    con.execute("INSERT INTO schema_version (version) VALUES (1)")
    con.execute("INSERT INTO scans (scan_id, source) VALUES ('old', 'old.nii.gz')")
    con.close()
    with Store(path) as store:
        assert store.schema_version() == SCHEMA_VERSION
        rows = store.db.rows("SELECT scan_id, source, archive_root FROM scans")
    assert rows == [("old", "old.nii.gz", None)]


def test_an_index_left_by_another_database_is_not_reused(tmp_path):
    """Ids restart at 1 in a new file: the same count and ids must not pass for the same vectors."""
    path = tmp_path / "h.duckdb"
    rng = np.random.default_rng(5)
    for attempt in range(2):
        with Store(path) as store:
            store.models.register(
                ModelRow(model_id="m", name="n", dim=8, config={}, weights_path=None, weights_digest="d")
            )
            coll = store.collection(model_id="m", fingerprint="f", dim=8)
            x = _unit(rng, 4, 8)
            coll.add(scan_ids=[f"s{i}" for i in range(4)], vectors=x)
            index = open_index(coll)
            result = index.search(x[:1], k=1, model_id="m", fingerprint="f")
            assert result.D[0, 0] == pytest.approx(1.0, abs=1e-5), attempt
        if attempt == 0:
            path.unlink()  # the database goes; its .faiss folder stays behind


def test_delete_embeddings(store):
    coll = store.collection(model_id="m-1", fingerprint="pp-a", dim=8)
    coll.add(scan_ids=["a", "b"], vectors=np.eye(2, 8, dtype=np.float32))
    assert coll.delete(["a", "zzz"]) == 1
    assert coll.vectors()[2] == ["b"]


def test_an_index_from_a_copy_that_diverged_is_rebuilt(tmp_path, caplog):
    """Two copies of one database (same store identity) each embed other scans under the same new ids: an index
    copied from one to the other must not be used (its scores belong to other vectors)."""
    import shutil

    rng = np.random.default_rng(7)
    a = tmp_path / "a" / "h.duckdb"
    a.parent.mkdir()
    with Store(a) as store:
        store.models.register(ModelRow(model_id="m", name="n", dim=8, config={}, weights_path=None, weights_digest="d"))
        store.collection(model_id="m", fingerprint="f", dim=8).add(scan_ids=["s0", "s1"], vectors=_unit(rng, 2, 8))
    shutil.copytree(a.parent, tmp_path / "b")
    b = tmp_path / "b" / "h.duckdb"
    xa, xb = _unit(rng, 2, 8), _unit(rng, 2, 8)
    for path, x in ((a, xa), (b, xb)):
        with Store(path) as store:
            coll = store.collection(model_id="m", fingerprint="f")
            coll.add(scan_ids=["new0", "new1"], vectors=x)
            assert coll.ids().tolist() == [1, 2, 3, 4]  # the same ids in both copies
            open_index(coll)
    shutil.rmtree(str(b) + ".faiss")
    shutil.copytree(str(a) + ".faiss", str(b) + ".faiss")  # a's index, copied into b
    with Store(b) as store, caplog.at_level("WARNING"):
        coll = store.collection(model_id="m", fingerprint="f")
        result = open_index(coll).search(xb[:1], k=1, model_id="m", fingerprint="f")
    assert "other rows" in caplog.text
    assert result.D[0, 0] == pytest.approx(1.0, abs=1e-5)  # b's own vector, found in the rebuilt index


def test_paths_inside_the_database_folder_are_stored_relative(tmp_path):
    """A database moved together with its folder (weights in .models, an archive beside it) keeps working;
    a path outside the folder stays absolute, so a database moved alone still finds it."""
    import shutil

    from hctembed.index.store.paths import resolved_path, stored_path

    folder = tmp_path / "project"
    db = folder / "h.duckdb"
    folder.mkdir()
    outside = tmp_path / "elsewhere" / "archive"
    assert stored_path(str(folder / "h.duckdb.models" / "w.safetensors"), db=db) == "h.duckdb.models/w.safetensors"
    assert stored_path(str(outside), db=db) == str(outside)
    assert resolved_path("archive", db=db) == str(folder / "archive")
    with Store(db) as store:
        weights = folder / "h.duckdb.models" / "w.safetensors"
        store.models.register(
            ModelRow(model_id="m", name="n", dim=8, config={}, weights_path=str(weights), weights_digest="d")
        )
        store.scans.upsert([ScanRow(scan_id="s0"), ScanRow(scan_id="s1")])
        store.record_locations(
            [Location("s0", str(folder / "archive"), "s0.nii.gz"), Location("s1", str(outside), "s1.nii.gz")]
        )
        coll = store.collection(model_id="m", fingerprint="f", dim=8)
        coll.add(scan_ids=["s0", "s1"], vectors=_unit(np.random.default_rng(0), 2, 8))
    stored = duckdb.connect(str(db), read_only=True)
    assert stored.execute("SELECT weights_path FROM models").fetchone()[0] == "h.duckdb.models/w.safetensors"
    paths = stored.execute("SELECT count(*) FROM scans WHERE archive_root IS NOT NULL OR source IS NOT NULL")
    assert paths.fetchone()[0] == 0
    stored.close()
    located = sqlite3.connect(folder / "h.duckdb.locator")
    assert sorted(r[0] for r in located.execute("SELECT root FROM locations")) == sorted(["archive", str(outside)])
    located.close()
    shutil.move(str(folder), str(tmp_path / "moved"))
    moved = tmp_path / "moved"
    with Store(moved / "h.duckdb", read_only=True) as store:
        assert store.models.get("m").weights_path == str(moved / "h.duckdb.models" / "w.safetensors")
        hits = store.resolve_collection().hits([1, 2])
        assert hits[1].path == str(moved / "archive" / "s0.nii.gz") and hits[2].path == str(outside / "s1.nii.gz")


def test_a_database_written_before_the_locator_has_its_paths_moved_to_the_locator(tmp_path):
    """Schema v5 files recorded each scan's archive and relative path in ``scans``: the next open for writing
    moves them to the locator and clears the columns, and hits still find the files."""
    db = tmp_path / "h.duckdb"
    with Store(db) as store:
        store.scans.upsert([ScanRow(scan_id="s0")])
        store.db.run("UPDATE scans SET archive_root = 'archive', source = 'sub/s0.nii.gz'")
        coll = store.collection(model_id="m", fingerprint="f", dim=8)
        coll.add(scan_ids=["s0"], vectors=_unit(np.random.default_rng(0), 1, 8))
    with Store(db, read_only=True) as store:  # a reader finds them where they are
        assert store.resolve_collection().hits([1])[1].path == str(tmp_path / "archive" / "sub" / "s0.nii.gz")
    with Store(db) as store:
        assert store.db.one("SELECT source, archive_root FROM scans") == (None, None)
        assert store.resolve_collection().hits([1])[1].path == str(tmp_path / "archive" / "sub" / "s0.nii.gz")


def test_files_left_by_an_interrupted_write_are_swept_when_the_database_is_next_written(tmp_path):
    import os
    import time

    db = tmp_path / "h.duckdb"
    Store(db).close()
    faiss_dir, models = tmp_path / "h.duckdb.faiss", tmp_path / "h.duckdb.models"
    faiss_dir.mkdir()
    models.mkdir()
    stale = [
        faiss_dir / "c1.faiss.abc123.tmp",
        models / ".vit-micro-1234.999.safetensors",
        models / ".vit-micro-1234.999.json",
    ]
    fresh = faiss_dir / "c1.json.def456.tmp"  # another process may be writing it right now
    kept = models / "vit-micro-1234.safetensors"
    for path in [*stale, fresh, kept]:
        path.write_bytes(b"x")
    old = time.time() - 3600
    for path in [*stale, kept]:
        os.utime(path, (old, old))
    with Store(db, read_only=True):
        assert all(p.exists() for p in stale)  # readers never sweep
    with Store(db):
        pass
    assert not any(p.exists() for p in stale) and fresh.exists() and kept.exists()
