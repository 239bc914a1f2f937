"""The settings that make the published recipe expressible (issue 30): per-channel input standardisation saved
with the weights, stochastic depth, DINO's per-parameter gradient clipping, the teacher-temperature warm-up in
epochs, and ``--recipe fmhct`` with each value's source in the card."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hctembed.augment import input_from_base
from hctembed.cli.app import app
from hctembed.config import VIT_PRESETS
from hctembed.errors import InputError
from hctembed.index.store import Store
from hctembed.io.archive import discover
from hctembed.model.checkpoint import load_encoder_weights
from hctembed.model.encoders import load_encoder
from hctembed.model.vit3d import ViT3D, drop_path
from hctembed.pretrain import PretrainConfig, PretrainError, run_pretrain
from hctembed.pretrain.cache import read_base
from hctembed.pretrain.loop import clip_gradients
from hctembed.pretrain.methods import build_method
from hctembed.pretrain.recipes import PAPER, apply_recipe
from hctembed.synth import generate_archive
from hctembed.synth.protocol import SynthConfig

MICRO = VIT_PRESETS["vit-micro"]
TINY = PretrainConfig(
    method="dino", model="vit-micro", epochs=2, batch_size=2, prototypes=64, head_hidden=64, bottleneck=32,
    local_crops=1, lr=1e-3, checkpoint_every=100,
)  # fmt: skip


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-archive")
    generate_archive(root, n=4, seed=5, config=SynthConfig(matrix=64))
    return root


def test_a_standardising_encoder_equals_a_plain_one_fed_standardised_input():
    torch.manual_seed(0)
    plain = ViT3D(MICRO).eval()
    std = ViT3D(replace(MICRO, input_norm="standardise")).eval()
    std.load_state_dict(plain.state_dict(), strict=False)  # the same weights; the statistics are extra buffers
    mean, sd = torch.tensor([0.2, 0.1, 0.05]), torch.tensor([0.3, 0.2, 0.1])
    std.set_input_stats(mean=mean, std=sd)
    x = torch.rand(2, 3, 48, 48, 48)
    expected = plain.forward_features((x - mean.view(1, 3, 1, 1, 1)) / sd.view(1, 3, 1, 1, 1))
    torch.testing.assert_close(std.forward_features(x), expected)
    assert {"input_mean", "input_std"} <= set(std.state_dict())  # saved with the weights
    with pytest.raises(InputError, match="std > 0"):
        std.set_input_stats(mean=mean, std=torch.zeros(3))
    with pytest.raises(InputError, match="shape"):
        std.set_input_stats(mean=torch.zeros(2), std=torch.ones(2))
    with pytest.raises(InputError, match="no statistics"):
        plain.set_input_stats(mean=mean, std=sd)
    with pytest.raises(InputError, match="input_norm"):
        replace(MICRO, input_norm="zscore")


def test_drop_path_is_the_identity_in_evaluation_and_drops_whole_samples_in_training():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 5)
    assert drop_path(x, rate=0.3, training=False) is x
    out = drop_path(x, rate=0.3, training=True)
    per_sample = out[:, 0, 0]
    kept = per_sample[per_sample != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.7))
    assert (out == out[:, :1, :1]).all()  # a sample is dropped or kept whole
    assert abs(float((per_sample == 0).float().mean()) - 0.3) < 0.03 and abs(float(out.mean()) - 1.0) < 0.05
    torch.manual_seed(1)
    a = ViT3D(replace(MICRO, drop_path=0.2)).eval()
    b = ViT3D(MICRO).eval()
    b.load_state_dict(a.state_dict())
    assert [blk.drop_rate for blk in a.blocks] == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])  # DINO's linear rule
    v = torch.rand(1, 3, 48, 48, 48)
    torch.testing.assert_close(a(v), b(v))
    with pytest.raises(InputError, match="drop_path"):
        replace(MICRO, drop_path=1.0)


def test_per_parameter_clipping_is_dinos_rule_and_global_is_torchs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    grads = [torch.randn_like(p) * s for p, s in zip(net.parameters(), (10.0, 0.01, 3.0, 0.5), strict=True)]
    for p, g in zip(net.parameters(), grads, strict=True):
        p.grad = g.clone()
    clip_gradients(net, max_norm=1.0, mode="per-parameter")
    for p, g in zip(net.parameters(), grads, strict=True):  # DINO utils.clip_gradients, restated
        norm = float(g.norm())
        coef = 1.0 / (norm + 1e-6)
        expected = g * coef if coef < 1 else g
        torch.testing.assert_close(p.grad, expected)
    for p, g in zip(net.parameters(), grads, strict=True):
        p.grad = g.clone()
    clip_gradients(net, max_norm=1.0, mode="global")
    total = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    for p, g in zip(net.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g / (total + 1e-6), rtol=1e-5, atol=1e-7)
    with pytest.raises(PretrainError, match="clip mode"):
        replace(TINY, clip_mode="layer")


def test_teacher_temperature_warm_up_follows_the_epochs_when_the_cap_is_lifted():
    config = replace(TINY, teacher_temp_warmup_epochs=30.0, warmup_teacher_temp=0.04, teacher_temp=0.07)
    method = build_method(config, device=torch.device("cpu"), generator=torch.Generator())
    capped = method.schedules(steps_per_epoch=10, total_steps=100, peak_lr=1e-3)
    assert capped.at(30)["teacher_temp"] == pytest.approx(0.07)  # squeezed into 30 % of a 10-epoch run
    method.config = replace(config, teacher_temp_max_share=1.0)
    exact = method.schedules(steps_per_epoch=10, total_steps=100, peak_lr=1e-3)
    assert exact.at(99)["teacher_temp"] == pytest.approx(0.04 + 0.03 * 99 / 299)  # 30 epochs = 300 steps


def test_fmhct_recipe_sets_the_papers_values_and_explicit_options_win():
    config, sources = apply_recipe(replace(TINY, local_crops=1), name="fmhct", explicit={"local_crops"})
    assert config.local_crops == 1 and sources["local_crops"] == "user"
    assert config.lr is None and "linear rule" in sources["lr"]  # base 3e-4 x batch / 256 at run time
    assert (config.betas, config.weight_decay, config.warmup_epochs) == ((0.9, 0.95), 0.05, 5.0)
    assert sources["weight_decay"] == PAPER
    assert config.clip_mode == "per-parameter" and config.drop_path == 0.1 and config.input_norm == "standardise"
    assert config.teacher_temp == config.warmup_teacher_temp == 0.04 and config.prototypes == 65536
    mae, mae_sources = apply_recipe(replace(TINY, method="mae"), name="fmhct", explicit={"mae.mask_ratio"})
    assert (mae.mae.decoder_depth, mae.mae.norm_pix_loss, mae.clip_grad) == (8, True, 0.0)
    assert mae.mae.mask_ratio == TINY.mae.mask_ratio and mae_sources["mae.mask_ratio"] == "user"
    with pytest.raises(PretrainError, match="not simclr"):
        apply_recipe(replace(TINY, method="simclr"), name="fmhct", explicit=set())
    with pytest.raises(PretrainError, match="unknown recipe"):
        apply_recipe(TINY, name="byol", explicit=set())


def test_standardised_pretraining_fits_the_statistics_saves_them_and_embed_applies_them(archive, tmp_path):
    config = replace(TINY, input_norm="standardise", drop_path=0.1, clip_mode="per-parameter", max_steps=2)
    refs = discover(archive)
    result = run_pretrain(refs=refs, config=config, out=tmp_path / "run", cache_dir=tmp_path / "cache")
    # the statistics: numpy over every training scan's embedding-time input
    inputs = np.stack([input_from_base(read_base(p), image_size=48).numpy() for p in
                       sorted((tmp_path / "cache").glob("*.npy"))])  # fmt: skip
    channels = inputs.transpose(1, 0, 2, 3, 4).reshape(3, -1).astype(np.float64)
    model, _ = load_encoder_weights(result.encoder_path)
    np.testing.assert_allclose(model.input_mean.numpy(), channels.mean(1), rtol=1e-5)
    np.testing.assert_allclose(model.input_std.numpy(), channels.std(1), rtol=1e-4)
    card = json.loads((tmp_path / "run" / "encoder.json").read_text())["card"]
    assert card["input_norm"] == "standardise" and card["clip_mode"] == "per-parameter" and card["drop_path"] == 0.1
    np.testing.assert_allclose(card["input_stats"]["mean"], channels.mean(1), rtol=1e-5)
    assert card["fingerprint"].endswith("+standardise")
    encoder = load_encoder("vit-micro", weights=result.encoder_path)
    assert encoder.fingerprint == card["fingerprint"] and not model.training
    # a resumed run keeps the statistics of its start (from the checkpoint), not refitted ones
    resumed = run_pretrain(refs=refs, config=replace(config, max_steps=3), out=tmp_path / "run", resume=True,
                           cache_dir=tmp_path / "cache")  # fmt: skip
    torch.testing.assert_close(resumed.backbone.input_mean, model.input_mean)


def test_cli_recipe_records_each_values_source_and_embed_stores_the_standardised_vectors(archive, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["pretrain", archive, "--method", "dino", "--config", "vit-micro", "--out", out, "--epochs", "1"]
    args += ["--max-steps", "1", "--batch-size", "2", "--recipe", "fmhct", "--local-crops", "1", "--quiet"]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "encoder.json").read_text())["card"]
    assert card["recipe"]["name"] == "fmhct" and card["recipe"]["sources"]["local_crops"] == "user"
    assert card["recipe"]["sources"]["weight_decay"] == PAPER
    assert card["peak_lr"] == pytest.approx(3e-4 * 2 / 256)  # the linear rule at a global batch of 2
    saved = json.loads(torch.load(out / "checkpoint.pt", weights_only=True)["config"])
    assert saved["clip_mode"] == "per-parameter" and saved["input_norm"] == "standardise" and saved["local_crops"] == 1
    db = tmp_path / "h.duckdb"
    args = ["embed", archive, "--db", db, "--model", "vit-micro", "--weights", out / "encoder.safetensors"]
    result = runner.invoke(app, [str(a) for a in [*args, "--workers", "0", "--quiet"]])
    assert result.exit_code == 0, result.output
    with Store(db, read_only=True) as store:
        collection = store.resolve_collection()
        assert collection.fingerprint.endswith("+standardise")
    bad = runner.invoke(app, ["pretrain", str(archive), "--method", "simclr", "--recipe", "fmhct", "--out",
                              str(tmp_path / "x")])  # fmt: skip
    assert bad.exit_code == 2 and "not simclr" in bad.output
    bad = runner.invoke(app, ["pretrain", str(archive), "--input-norm", "zscore", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown input norm" in bad.output
