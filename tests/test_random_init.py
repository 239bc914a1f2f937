"""A random-initialised encoder is never written to disk: its card's seed rebuilds it bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.errors import InputError
from hctembed.index.store import ModelMismatchError, Store
from hctembed.model.checkpoint import save_encoder
from hctembed.model.encoders import load_encoder, rebuild_encoder

runner = CliRunner()


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_card_rebuilds_the_encoder_bit_for_bit():
    first = load_encoder("vit-micro", seed=3)
    assert first.card == {"init": "random", "seed": 3} and first.weights_path is None
    again = rebuild_encoder(name="vit-micro", model_id=first.model_id, weights_path=None, card=first.card)
    assert again.model_id == first.model_id and _same_weights(first, again)
    other = load_encoder("vit-micro", seed=4)
    assert other.model_id != first.model_id and not _same_weights(first, other)


def test_a_rebuild_that_differs_or_lacks_a_seed_is_refused():
    encoder = load_encoder("vit-micro", seed=3)
    with pytest.raises(InputError, match="now model"):
        rebuild_encoder(name="vit-micro", model_id="vit-micro-000000000000", weights_path=None, card=encoder.card)
    with pytest.raises(InputError, match="no weights file and no seed"):
        rebuild_encoder(name="vit-micro", model_id=encoder.model_id, weights_path=None, card={})


def test_a_weights_file_still_rebuilds_from_the_file(tmp_path):
    encoder = load_encoder("vit-micro", seed=5)
    path = tmp_path / "w.safetensors"
    save_encoder(encoder.model, path, card={"note": "trained"})
    again = rebuild_encoder(name="vit-micro", model_id=encoder.model_id, weights_path=str(path), card={})
    assert _same_weights(encoder, again) and again.weights_path == str(path.resolve())
    with pytest.raises(InputError, match="not found"):
        rebuild_encoder(name="vit-micro", model_id=encoder.model_id, weights_path=str(tmp_path / "gone"), card={})


def test_embed_writes_no_weights_and_a_file_query_finds_its_own_scan(tmp_path, monkeypatch):
    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    archive = tmp_path / "archive"
    result = runner.invoke(app, ["synth", str(archive), "--n", "4", "--matrix", "48", "--quiet"])
    assert result.exit_code == 0, result.output
    db = tmp_path / "h.duckdb"
    result = runner.invoke(app, ["embed", str(archive), "--db", str(db), "--model", "vit-micro", "--seed", "7",
                                 "--workers", "0", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert set(summary["written"]) == {"h.duckdb", "h.duckdb.faiss/", "h.duckdb.locator"}
    assert all(size > 0 for size in summary["written"].values())
    assert not list(tmp_path.rglob("*.safetensors")) and not (tmp_path / "h.duckdb.models").exists()
    with Store(db, read_only=True) as store:
        collection = store.resolve_collection()
        row = collection.model()
        assert row.weights_path is None and row.card == {"init": "random", "seed": 7}
        _, vectors, scan_ids = collection.vectors()
    query = archive / f"{scan_ids[0]}.nii.gz"
    result = runner.invoke(app, ["search", str(query), "--db", str(db), "-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.stdout.splitlines()]
    assert hits[0]["scan_id"] == scan_ids[0] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    table = runner.invoke(app, ["search", str(query), "--db", str(db), "-k", "2"]).stdout
    assert f"the query file ({scan_ids[0]})" in table  # the file's content is that stored scan
    # the rebuilt encoder gives the stored vector again
    from hctembed.search import embed_file, stored_encoder

    with Store(db, read_only=True) as store:
        encoder = stored_encoder(store.resolve_collection())
    np.testing.assert_allclose(embed_file(encoder, query), vectors[0], atol=1e-6)


def test_a_database_whose_seed_now_draws_other_weights_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    archive = tmp_path / "archive"
    runner.invoke(app, ["synth", str(archive), "--n", "2", "--matrix", "48", "--quiet"])
    db = tmp_path / "h.duckdb"
    runner.invoke(app, ["embed", str(archive), "--db", str(db), "--model", "vit-micro", "--workers", "0", "-q"])
    import duckdb

    con = duckdb.connect(str(db))  # as if another torch build drew other weights from the same seed
    con.execute("""UPDATE models SET card = '{"init": "random", "seed": 99}'""")
    con.close()
    with Store(db, read_only=True) as store, pytest.raises(ModelMismatchError, match="seed 99 is now model"):
        from hctembed.search import stored_encoder

        stored_encoder(store.resolve_collection())
