"""Attentive probe (torch) and probe files and scores: chance on noise, well above chance on signal, strict loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hctembed.eval.classification import evaluate_task, fit_linear_probe
from hctembed.index.store import SCHEMA_VERSION, ProbeRow, Store
from hctembed.model.checkpoint import CheckpointError
from hctembed.probe.attentive import (
    AttentiveConfig,
    ProbeError,
    attentive_fit_score,
    attentive_scores,
    load_attentive,
    save_attentive,
    train_attentive,
)
from hctembed.probe.linear_file import load_linear, save_linear
from hctembed.probe.tokens import read_tokens_file


def token_data(n=240, t=12, d=16, seed=0, signal=True):
    """Positives carry a shifted token at a random position among noise tokens (only attention finds it)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    x = rng.normal(size=(n, t, d)).astype(np.float32)
    if signal:
        where = rng.integers(0, t, n)
        x[np.arange(n), where, 0] += 4.0 * (2 * y - 1)
    return x, y


@pytest.mark.parametrize("signal", [True, False])
def test_attentive_probe_beats_chance_only_on_signal(signal):
    x, y = token_data(signal=signal)
    train, test = np.arange(160), np.arange(160, 240)
    fit = attentive_fit_score(config_kw={"epochs": 10, "samples_per_epoch": 256, "heads": 4})
    r = evaluate_task(fit, x, y, task="t", train=train, test=test, n_resamples=50)
    if signal:
        assert r.auc.value > 0.9
    else:
        assert 0.35 <= r.auc.value <= 0.65


def test_attentive_save_load_roundtrip_and_strictness(tmp_path):
    x, y = token_data(n=60)
    probe = train_attentive(x, y, config=AttentiveConfig(dim=16, epochs=1, samples_per_epoch=32))
    path = tmp_path / "p.safetensors"
    save_attentive(probe, path, meta={"model_id": "m", "task": "SDH"})
    loaded, meta = load_attentive(path)
    assert meta == {"model_id": "m", "task": "SDH"}
    np.testing.assert_allclose(attentive_scores(loaded, x), attentive_scores(probe, x), rtol=1e-6)
    # training is deterministic for a seed
    again = train_attentive(x, y, config=AttentiveConfig(dim=16, epochs=1, samples_per_epoch=32))
    np.testing.assert_allclose(attentive_scores(again, x), attentive_scores(probe, x), rtol=1e-6)
    # a missing tensor is named
    from safetensors.torch import load_file, safe_open, save

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    del state["query"]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save(state, metadata=metadata))
    with pytest.raises(CheckpointError, match=r"missing.*query"):
        load_attentive(bad)
    with pytest.raises(ProbeError, match="not found"):
        load_attentive(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="divisible"):
        AttentiveConfig(dim=10, heads=4)


def test_linear_file_roundtrip_and_strictness(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 6))
    y = (x[:, 0] > 0).astype(float)
    probe = fit_linear_probe(x, y)
    path = tmp_path / "p.json"
    save_linear(probe, path, meta={"model_id": "m", "task": "IPH"})
    loaded, meta = load_linear(path)
    np.testing.assert_array_equal(loaded.scores(x), probe.scores(x))
    assert meta["task"] == "IPH"
    doc = json.loads(path.read_text())
    doc["coef"] = doc["coef"][:-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(ProbeError, match="5 coefficients for dim 6"):
        load_linear(path)
    doc["extra"] = 1
    path.write_text(json.dumps(doc))
    with pytest.raises(ProbeError, match="unexpected \\['extra'\\]"):
        load_linear(path)


def test_probe_tables_and_scores_in_duckdb(tmp_path):
    with Store(tmp_path / "x.duckdb") as store:
        assert store.schema_version() == SCHEMA_VERSION >= 3
        store.probes.register(ProbeRow(probe_id="p1", kind="linear", model_id="m", task="SDH", path=None))
        assert store.probes.exists("p1") and not store.probes.exists("p2")
        write = store.probes.write_scores
        assert write(probe_id="p1", model_id="m", task="SDH", scan_ids=["a", "b"], scores=np.array([0.2, 0.9])) == 2
        write(probe_id="p1", model_id="m", task="SDH", scan_ids=["b"], scores=np.array([0.5]))
        assert store.probes.scores("p1") == {"a": 0.2, "b": 0.5}
        with pytest.raises(ValueError, match="2 scan ids"):
            write(probe_id="p1", model_id="m", task="SDH", scan_ids=["a", "b"], scores=np.zeros(3))


def test_tokens_file_alignment(tmp_path):
    tokens = np.arange(3 * 2 * 4, dtype=np.float32).reshape(3, 2, 4)
    path = tmp_path / "t.npz"
    np.savez(path, scan_ids=np.array(["a", "b", "c"]), tokens=tokens)
    np.testing.assert_array_equal(read_tokens_file(path, ["c", "a"]), tokens[[2, 0]])
    with pytest.raises(ProbeError, match="no tokens for 1 scans"):
        read_tokens_file(path, ["a", "z"])
    assert torch.is_tensor(torch.as_tensor(tokens))
