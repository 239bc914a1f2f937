"""The server answers from the collection's saved index (HNSW here), loaded from its file without reading the
vectors; its hits equal the CLI's on the same index; ``--exact`` and a stale saved index fall back to exact search
over the vectors; the live feed's additions and removals work with an approximate index (tombstones, then a
rebuild that drops them); every answer names the index that produced it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.index.store import Store
from hctembed.index.store.collection import Collection
from hctembed.serve import views
from hctembed.serve.state import ServerState, apply_batch

runner = CliRunner()
N, DIM = 3000, 32


def clustered(n: int, *, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIM))
    x = centres[rng.integers(0, 40, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def db(tmp_path):
    vectors = clustered(N, seed=0)
    np.save(tmp_path / "v.npy", vectors)
    (tmp_path / "v.scan_ids.txt").write_text("".join(f"scan-{i:05d}\n" for i in range(N)))
    path = tmp_path / "h.duckdb"
    result = runner.invoke(app, ["import-vectors", str(tmp_path / "v.npy"), "--db", str(path), "--name", "synthetic",
                                 "--index", "hnsw", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return path


def started(db, **kw) -> ServerState:
    state = ServerState(db, poll_s=3600, **kw)
    state.start()
    return state


def cli_hits(db, scan_id: str, k: int = 10) -> list[tuple[str, float]]:
    out = runner.invoke(app, ["search", "--id", scan_id, "--db", str(db), "-k", str(k), "--json"])
    assert out.exit_code == 0, out.output
    return [(h["scan_id"], h["score"]) for h in map(json.loads, out.stdout.splitlines())]


def test_the_server_answers_from_the_saved_hnsw_index_as_the_cli_does_without_reading_the_vectors(db, monkeypatch):
    def no_vectors(self):
        raise AssertionError("the server read the vectors although the saved index matches")

    monkeypatch.setattr(Collection, "vectors", no_vectors)
    state = started(db)
    try:
        view = state.view(None)
        assert (view.kind, view.name, view.source) == ("hnsw", "hnsw32", "the saved index file")
        assert view.answer() == {"index": "hnsw32", "exact": False}
        health = state.health()["models"][0]
        assert health["index"] == "hnsw32" and health["vectors"] == N
        monkeypatch.undo()
        for scan_id in ("scan-00007", "scan-01234", "scan-02999"):
            _, hits = state.search_id(scan_id, k=10)
            ours = [(h.scan_id, round(h.score, 6)) for h in hits]
            assert ours == cli_hits(db, scan_id)
    finally:
        state.stop()


def test_exact_on_request_and_when_the_saved_index_is_stale(db):
    vectors = clustered(N, seed=0)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    state = started(db, exact=True)
    try:
        view = state.view(None)
        assert view.answer() == {"index": "flat", "exact": True}
        _, hits = state.search_id("scan-00042", k=5)
        truth = np.argsort(-(unit @ unit[42]), kind="stable")[1:6]
        assert [h.scan_id for h in hits] == [f"scan-{i:05d}" for i in truth]
    finally:
        state.stop()
    with Store(db) as store:  # the database moves on, the saved index does not
        store.resolve_collection().delete(["scan-00001"])
    state = started(db)
    try:
        assert state.view(None).answer() == {"index": "flat", "exact": True}
        assert "(the saved index: stale (3000 vectors indexed, 2999" in state.health()["models"][0]["index_from"]
    finally:
        state.stop()


def _rows(view, op: str, scan_ids, ids, vectors=None) -> list[dict]:
    return [
        {"collection_id": view.collection_id, "model_id": view.model_id, "fingerprint": view.fingerprint, "op": op,
         "scan_id": s, "id": int(i), "vector": None if vectors is None else vectors[k].tolist(), "planes": None,
         "patient_id": None, "labels": "{}"}
        for k, (s, i) in enumerate(zip(scan_ids, ids, strict=True))
    ]  # fmt: skip


def test_the_live_feed_adds_to_and_removes_from_an_approximate_index(db, monkeypatch):
    monkeypatch.setattr(views, "REBUILD_MIN", 50)
    monkeypatch.setattr(views, "REBUILD_SHARE", 0.01)
    state = started(db)
    try:
        view = state.view(None)
        new = clustered(5, seed=9)
        apply_batch(state.catalogue, _rows(view, "add", [f"new-{i}" for i in range(5)], range(10**6, 10**6 + 5), new))
        assert view.kind == "hnsw" and view.live == N + 5
        top = state.search_vector(new[1], view=view, k=1)
        assert top[0].scan_id == "new-1"
        gone = [f"scan-{i:05d}" for i in range(0, 300, 5)]  # 60 removals: past the (patched) threshold
        nearest = [h.scan_id for h in state.search_id("scan-00001", k=20)[1]]
        apply_batch(state.catalogue, _rows(view, "delete", gone, [view.id_of(s) for s in gone]))
        assert len(view.removed) == 60 and view.needs_rebuild()
        after = [h.scan_id for h in state.search_id("scan-00001", k=20)[1]]
        assert not set(after) & set(gone) and [s for s in nearest if s not in gone] == after[: len(
            [s for s in nearest if s not in gone])]  # fmt: skip
        state.refresh()  # the poll thread's pass: rebuilds the graph without the tombstones, swaps it in
        assert view.removed == set() and int(view.index.ntotal) == N + 5 - 60 and view.name == "hnsw32"
        assert not {h.scan_id for h in state.search_id("scan-00001", k=50)[1]} & set(gone)
        assert state.search_vector(new[2], view=view, k=1)[0].scan_id == "new-2"
    finally:
        state.stop()


def test_index_build_switches_kind_and_the_server_follows(db):
    result = runner.invoke(app, ["index", "build", "--db", str(db), "--kind", "exact", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["kind"] == "exact"
    state = started(db)
    try:
        assert state.view(None).answer() == {"index": "flat", "exact": True}
        assert state.view(None).source == "the saved index file"
    finally:
        state.stop()
    bad = runner.invoke(app, ["index", "build", "--db", str(db), "--kind", "annoy"])
    assert bad.exit_code == 2 and "--kind must be one of" in bad.output


def test_the_key_map_answers_as_two_dictionaries_would():
    rng = np.random.default_rng(3)
    ids = rng.permutation(np.arange(10, 5010)).astype(np.int64)
    names = [f"s{int(i) * 7 % 9973:05d}-{int(i)}" for i in ids]
    keys = views.KeyMap(ids, names)
    id_of = dict(zip(names, ids.tolist(), strict=True))
    for op in range(3000):
        if op % 3 == 0:  # a new scan, or a new vector of a known one
            name = f"new-{op}" if op % 2 else names[op % len(names)]
            vid = 10**6 + op
            old = keys.remove(name)
            assert old == id_of.pop(name, None)
            keys.add(name, vid)
            id_of[name] = vid
        elif op % 3 == 1:
            name = names[(op * 13) % len(names)]
            assert keys.remove(name) == id_of.pop(name, None)
    scan_of = {v: k for k, v in id_of.items()}
    for name in [*names, *(f"new-{op}" for op in range(0, 3000, 3)), "absent"]:
        assert keys.id_of(name) == id_of.get(name)
    for vid in [*ids.tolist(), *range(10**6, 10**6 + 3000), -1]:
        assert keys.scan_of(int(vid)) == scan_of.get(int(vid))
