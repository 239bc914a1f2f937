"""The embedding map: PCA against scikit-learn, colours from labels, a labels CSV and scans.meta, the PNG."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from matplotlib.image import imread
from sklearn.decomposition import PCA

from hctembed.embedding_map import MapError, colouring, embedding_map, pca_2d, project
from hctembed.index.store import ModelRow, ScanRow, Store

N, DIM = 40, 16


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, DIM)).astype(np.float32) * np.linspace(3, 0.2, DIM).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scan_ids = [f"s{i:02d}" for i in range(N)]
    with Store(tmp_path / "m.duckdb") as st:
        st.models.register(
            ModelRow(model_id="m-1", name="vit-micro", dim=DIM, config={}, weights_path=None, weights_digest="d")
        )
        coll = st.collection(model_id="m-1", fingerprint="pp-x", dim=DIM)
        coll.add(scan_ids=scan_ids, vectors=x)
        st.scans.upsert(
            [
                ScanRow(scan_id=s, format="nifti", meta={"spacing_xyz": [0.5, 0.5, [1.0, 2.5, 5.0][i % 3]]})
                for i, s in enumerate(scan_ids)
            ]
        )
        # SDH: positive / negative, and unknown for the last 5 scans
        st.labels.set([(s, "SDH", float(i % 2)) for i, s in enumerate(scan_ids[:-5])], origin="test")
        yield st, x, scan_ids


def test_pca_equals_sklearn_up_to_sign(store):
    _, x, _ = store
    ours = pca_2d(x)
    ref = PCA(n_components=2).fit_transform(x.astype(np.float64))
    for c in range(2):
        sign = np.sign(ours[:, c] @ ref[:, c])
        np.testing.assert_allclose(ours[:, c] * sign, ref[:, c], atol=1e-6)
    np.testing.assert_allclose(project(x, method="pca"), ours)


def test_umap_only_when_installed(store):
    _, x, _ = store
    try:
        import umap  # noqa: F401
    except ImportError:
        with pytest.raises(MapError, match="not installed"):
            project(x, method="umap")
    else:
        assert project(x, method="umap").shape == (N, 2)
    with pytest.raises(MapError):
        project(x[:2])


def test_label_colours_give_one_legend_entry_per_value(store, tmp_path):
    st, _, scan_ids = store
    result = embedding_map(st, color_by="SDH", out=tmp_path / "sdh.png")
    values = colouring(st, scan_ids, color_by="SDH").values
    assert len(result.legend) == len(set(values)) == 3  # negative, positive, unknown
    assert sorted(e.split(" (")[0] for e in result.legend) == ["negative", "positive", "unknown"]
    assert "unknown (n=5)" in result.legend
    assert imread(tmp_path / "sdh.png").shape[:2] == (800, 1000)
    np.testing.assert_allclose(np.abs(result.coords), np.abs(pca_2d(store[1])), atol=1e-9)


def test_protocol_colours_from_meta_and_csv(store, tmp_path):
    st, _, scan_ids = store
    by_meta = embedding_map(st, color_by="slice_thickness", out=tmp_path / "t.png")
    assert [e.split(" ")[0] for e in by_meta.legend] == ["1", "2.5", "5"]
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scan_id", "manufacturer", "noise_hu"])
        for i, s in enumerate(scan_ids):
            w.writerow([s, ["A", "B", "C", "D"][i % 4], 5 + i * 0.37])
    by_csv = embedding_map(st, color_by="manufacturer", labels_csv=csv_path, out=tmp_path / "m.png")
    assert by_csv.legend == [f"{m} (n=10)" for m in "ABCD"]
    continuous = embedding_map(st, color_by="noise_hu", labels_csv=csv_path, out=tmp_path / "n.png")
    assert continuous.legend == []  # 40 distinct numbers: a colourbar, not a legend
    png = imread(tmp_path / "n.png")
    assert png.shape[:2] == (800, 1000) and png[..., :3].std() > 0.05
    with pytest.raises(MapError, match="available"):
        colouring(st, scan_ids, color_by="kernel", labels_csv=csv_path)
