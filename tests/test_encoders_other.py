"""The `precomputed` adapter: external vectors (e.g. Google CT Foundation's 1408-d) imported as a collection."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.index.precomputed import VectorsFileError, read_vectors
from hctembed.index.store import Store

runner = CliRunner()


def test_import_vectors_npy_and_parquet_land_as_collections(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 1408)).astype(np.float32)
    ids = [f"s{i:02d}" for i in range(12)]
    np.save(tmp_path / "g.npy", x)
    (tmp_path / "g.scan_ids.txt").write_text("\n".join(ids))
    pq.write_table(pa.table({"scan_id": ids, "vector": x[:, :64].tolist()}), tmp_path / "m.parquet")
    db = tmp_path / "h.duckdb"
    out = []
    for file, name in (("g.npy", "google-ct"), ("m.parquet", "other")):
        result = runner.invoke(app, ["import-vectors", str(tmp_path / file), "--db", str(db), "--name", name, "-q"])
        assert result.exit_code == 0, result.output
        out.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert out[0]["dim"] == 1408 and out[1]["dim"] == 64 and out[0]["model_id"].startswith("precomputed-google-ct-")
    with Store(db, read_only=True) as store:
        _, stored, scan_ids = store.resolve_collection(model_id=out[0]["model_id"]).vectors()
    order = [ids.index(s) for s in scan_ids]
    np.testing.assert_allclose(stored, x[order] / np.linalg.norm(x[order], axis=1, keepdims=True), rtol=1e-5)
    assert len(stored) == 12


def test_import_vectors_errors(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 4), np.float32))
    with pytest.raises(VectorsFileError, match=r"a\.scan_ids\.txt"):
        read_vectors(tmp_path / "a.npy", name="x")
    (tmp_path / "a.scan_ids.txt").write_text("p\nq\n")
    with pytest.raises(VectorsFileError, match="2 scan ids but vectors of shape"):
        read_vectors(tmp_path / "a.npy", name="x")
    with pytest.raises(VectorsFileError, match="not found"):
        read_vectors(tmp_path / "none.parquet", name="x")
