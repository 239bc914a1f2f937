"""Index choice: exact / HNSW / IVF-Flat / IVF-PQ (+ exact re-ranking) / auto, with recall measured at build time.

Every recall claim in a manifest is checked against numpy brute force on other queries than the ones the
build measured with.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.index import choice
from hctembed.index.choice import IndexOptions, factory_for
from hctembed.index.store import ModelRow, Store
from hctembed.index.vectors import open_index

N, DIM = 5000, 64


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    return _unit(np.random.default_rng(6), N, DIM)


def _store(path, x):
    store = Store(path)
    store.models.register(
        ModelRow(model_id="m-1", name="vit-micro", dim=x.shape[1], config={}, weights_path=None, weights_digest="d")
    )
    coll = store.collection(model_id="m-1", fingerprint="pp", dim=x.shape[1])
    coll.add(scan_ids=[f"s{i}" for i in range(len(x))], vectors=x)
    return store, coll


def _numpy_recall(index, ids, x, queries, k=10):
    """Recall@k of new query vectors ``queries [Q, d]`` against numpy brute force over the stored ``x``."""
    truth = ids[np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]]
    found = index.search(queries, k=k, model_id="m-1", fingerprint="pp").I
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf", "ivfpq"])
def test_each_kind_has_the_recall_its_manifest_claims(tmp_path, vectors, kind):
    store, coll = _store(tmp_path / "h.duckdb", vectors)
    with store:
        index = open_index(coll, options=IndexOptions(kind=kind))
        _, manifest_path = coll.index_files()
        manifest = json.loads(manifest_path.read_text())
        ids = coll.ids()
        assert manifest["kind"] == kind and manifest["requested"] == kind and index.kind == kind
        assert manifest["factory"] == factory_for(kind, n=N, dim=DIM) == index.factory
        assert manifest["ntotal"] == N
        # unseen queries, as the build's held-out sample was: new random unit vectors
        queries = _unit(np.random.default_rng(99), 400, DIM)
        measured = _numpy_recall(index, ids, vectors, queries)
        assert abs(measured - manifest["recall_at_10"]) <= 0.04, (measured, manifest)
        if kind == "exact":
            assert manifest["recall_at_10"] == 1.0 and measured == 1.0
        else:
            assert manifest["recall_queries"] == 200 and manifest["search_params"]
            assert manifest["p50_ms"] > 0 and manifest["build_seconds"] > 0
            # the ladder stops at the target (0.95), which each kind reaches here (IVF is exact at nprobe = nlist)
            assert manifest["recall_at_10"] >= 0.95
        # reloading applies the saved search parameters: same answers, no rebuild
        before = index.search(queries[:20], k=10, model_id="m-1", fingerprint="pp").I
        mtime = manifest_path.stat().st_mtime_ns
        again = open_index(coll)
        assert manifest_path.stat().st_mtime_ns == mtime and again.kind == kind
        np.testing.assert_array_equal(again.search(queries[:20], k=10, model_id="m-1", fingerprint="pp").I, before)


def test_auto_picks_exact_on_a_small_collection(tmp_path, vectors):
    store, coll = _store(tmp_path / "h.duckdb", vectors)
    with store:
        index = open_index(coll, options=IndexOptions(kind="auto"))
        manifest = json.loads(coll.index_files()[1].read_text())
    assert index.kind == "exact" and manifest["kind"] == "exact" and manifest["requested"] == "auto"
    assert manifest["recall_at_10"] == 1.0 and manifest["exact_p50_ms"] > 0 and "auto" in manifest["note"]


def test_auto_above_its_threshold_only_leaves_exact_for_a_faster_index_at_099(tmp_path, vectors, monkeypatch):
    monkeypatch.setattr(choice, "AUTO_MIN_VECTORS", 1000)
    x = vectors[:3000]
    store, coll = _store(tmp_path / "h.duckdb", x)
    with store:
        index = open_index(coll, options=IndexOptions(kind="auto"))
        manifest = json.loads(coll.index_files()[1].read_text())
        measured = _numpy_recall(index, coll.ids(), x, _unit(np.random.default_rng(98), 300, DIM))
    assert manifest["requested"] == "auto" and manifest["kind"] == index.kind
    if index.kind == "exact":
        assert measured == 1.0 and "no approximate index" in manifest["note"]
    else:  # timing decides which, but never an index below 0.99 or slower than exact
        assert manifest["recall_at_10"] >= 0.99 and manifest["p50_ms"] < manifest["exact_p50_ms"]
        assert measured >= 0.95


def test_stale_approximate_index_is_rebuilt_with_its_kind(tmp_path, vectors, caplog):
    store, coll = _store(tmp_path / "h.duckdb", vectors[:2000])
    with store:
        open_index(coll, options=IndexOptions(kind="hnsw"))
        (new_id,) = coll.add(scan_ids=["late"], vectors=vectors[4000:4001])
        index = open_index(coll)  # no kind asked: keep hnsw
        manifest = json.loads(coll.index_files()[1].read_text())
    assert "rebuilding" in caplog.text and "stale" in caplog.text
    assert index.kind == "hnsw" and manifest["kind"] == "hnsw" and manifest["ntotal"] == 2001
    hit = index.search(vectors[4000:4001], k=1, model_id="m-1", fingerprint="pp").I[0, 0]
    assert hit == new_id


def test_asking_for_another_kind_rebuilds_and_old_manifests_still_load(tmp_path, vectors, caplog):
    store, coll = _store(tmp_path / "h.duckdb", vectors[:500])
    with store:
        open_index(coll)
        _, manifest_path = coll.index_files()
        # a manifest written before index choice: none of the new fields
        old = {k: v for k, v in json.loads(manifest_path.read_text()).items() if k in _OLD_FIELDS}
        manifest_path.write_text(json.dumps(old))
        caplog.clear()
        assert open_index(coll).kind == "exact"  # loads, and is rebuilt once to record the rows it indexes
        assert "predates the check of the rows" in caplog.text
        caplog.clear()
        assert open_index(coll).kind == "exact"
        assert "rebuilding" not in caplog.text
        index = open_index(coll, options=IndexOptions(kind="ivf"))
        assert "index kind ivf requested" in caplog.text and index.kind == "ivf"
        assert json.loads(manifest_path.read_text())["factory"] == "IDMap2,IVF12,Flat"


_OLD_FIELDS = {"dim", "metric", "model_id", "fingerprint", "ntotal", "factory", "checksum", "ids_digest", "store_id"}


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        IndexOptions(kind="lsh")
    result = CliRunner().invoke(app, ["embed", "nowhere", "--db", "x.duckdb", "--index", "lsh"])
    assert result.exit_code == 2 and "--index must be one of" in result.output


def test_embed_cli_passes_the_index_kind(tmp_path):
    runner = CliRunner()
    archive, db = tmp_path / "a", tmp_path / "h.duckdb"
    assert (
        runner.invoke(app, ["synth", str(archive), "--n", "3", "--seed", "1", "--matrix", "64", "--quiet"]).exit_code
        == 0
    )
    result = runner.invoke(
        app, ["embed", str(archive), "--db", str(db), "--model", "vit-micro", "--workers", "0", "--index", "hnsw", "-q"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads(next((tmp_path / "h.duckdb.faiss").glob("c*.json")).read_text())
    # three vectors are too few to tune an approximate index: exact is built, the request is kept
    assert manifest["requested"] == "hnsw" and manifest["kind"] == "exact" and manifest["ntotal"] == 3


def test_large_collections_get_the_denser_graph_and_auto_tries_hnsw_alone(monkeypatch):
    from hctembed.index import choice

    assert choice.factory_for("hnsw", n=100_000, dim=768) == "IDMap2,HNSW32"
    assert choice.factory_for("hnsw", n=1_000_000, dim=768) == f"IDMap2,HNSW{choice.LARGE_HNSW_M}"
    assert list(choice.EF_LADDER) == sorted(choice.EF_LADDER) and 320 in choice.EF_LADDER
    tried = []
    real = choice._build_approximate

    def recording(kind, split, *, target, options):
        tried.append(kind)
        return real(kind, split, target=target, options=options)

    monkeypatch.setattr(choice, "_build_approximate", recording)
    monkeypatch.setattr(choice, "LARGE_COLLECTION", 20_000)  # stand in for 300,000 at test size
    monkeypatch.setattr(choice, "LARGE_HNSW_M", 16)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_500, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    built = choice.build(np.arange(len(x)), x, options=choice.IndexOptions(kind="auto"))
    assert tried == ["hnsw"] and built.kind in ("hnsw", "exact")
    if built.kind == "hnsw":
        assert built.factory == "IDMap2,HNSW16"
