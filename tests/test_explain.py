"""Attention maps, rollout and attention distance against independent numpy references; the figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.config import VIT_PRESETS, PreprocessConfig, ViTConfig
from hctembed.explain import (
    attention_distance,
    attention_rollout,
    cls_attention,
    explain,
    patch_size_mm,
    upsample,
    write_explanation,
)
from hctembed.io.archive import load_volume
from hctembed.model.encoders import load_encoder
from hctembed.model.vit3d import ViT3D
from hctembed.pictures.slices import display_slice
from hctembed.preprocessing import preprocess

TINY = ViTConfig(name="tiny-test", image_size=24, patch_size=8, dim=48, depth=2, heads=4, mlp_dim=96, register_tokens=2)


def tiny_model(seed: int = 0) -> ViT3D:
    torch.manual_seed(seed)
    model = ViT3D(TINY).eval()
    with torch.no_grad():  # random weights everywhere, so attention is far from uniform
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_patch_pitch_comes_from_the_preprocessing():
    paper = PreprocessConfig()  # 1 mm -> 192³ crop -> 96³: 2 mm voxels
    assert patch_size_mm(vit=VIT_PRESETS["vit-base"], preprocess=paper) == pytest.approx(24.0)
    micro = PreprocessConfig(out_size=48)  # 4 mm voxels, 8-voxel patches
    assert patch_size_mm(vit=VIT_PRESETS["vit-micro"], preprocess=micro) == pytest.approx(32.0)
    with pytest.raises(ValueError):
        patch_size_mm(vit=VIT_PRESETS["vit-micro"], preprocess=paper)


@pytest.mark.parametrize("renormalise", [True, False])
def test_attention_distance_equals_brute_force(renormalise):
    model = tiny_model()
    x = torch.rand(1, 3, 24, 24, 24)
    maps = model.attention_maps(x)
    pmm = 7.5
    got = attention_distance(maps, num_prefix=3, grid=3, patch_mm=pmm, renormalise=renormalise)[0]  # [L, H, N]
    a = [m[0].double().numpy() for m in maps]
    n, p = 27, 3

    def centre(i):
        z, rem = divmod(i, 9)
        y, xx = divmod(rem, 3)
        return np.array([z, y, xx]) * pmm + pmm / 2

    for layer in range(2):
        for head in range(4):
            for i in range(n):
                weights = a[layer][head, p + i, p : p + n]
                total = weights.sum() if renormalise else 1.0
                expected = 0.0
                for j in range(n):
                    expected += weights[j] / total * np.linalg.norm(centre(i) - centre(j))
                assert got[layer, head, i] == pytest.approx(expected, rel=1e-9)
    assert got.shape == (2, 4, 27)
    if not renormalise:  # prefix tokens take a share of each row, so the literal sum is smaller
        assert np.all(got <= attention_distance(maps, num_prefix=3, grid=3, patch_mm=pmm)[0] + 1e-9)


def test_rollout_equals_numpy():
    model = tiny_model(seed=1)
    maps = model.attention_maps(torch.rand(2, 3, 24, 24, 24))
    got = attention_rollout(maps, num_prefix=3)  # [B, N]
    for b in range(2):
        r = np.eye(30)
        for m in maps:
            a = m[b].double().numpy().mean(axis=0) + np.eye(30)
            a = a / a.sum(axis=1, keepdims=True)
            r = a @ r
        np.testing.assert_allclose(got[b], r[0, 3:], rtol=1e-10)
    last = maps[-1][0].double().numpy()
    np.testing.assert_allclose(cls_attention(maps, num_prefix=3)[0], last[:, 0, 3:].mean(axis=0), rtol=1e-6)


def attending_model(k_zyx: tuple[int, int, int]) -> tuple[ViT3D, torch.Tensor]:
    """Every query attends to the key of the one patch that holds signal: zero queries except a bias, keys
    that read the patch-embedding feature lit only by that patch, no residual updates."""
    model = ViT3D(TINY).eval()
    d, dh = TINY.dim, TINY.dim // TINY.heads
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [model.norm, *[m for b in model.blocks for m in (b.norm1, b.norm2)]]:
            ln.weight.fill_(1.0)
        model.patch_embed.weight[0, 0].fill_(1.0)  # feature 0 = sum of channel 0 over the patch
        for block in model.blocks:
            w, bias = block.attn.qkv.weight, block.attn.qkv.bias
            for h in range(TINY.heads):
                bias[h * dh] = 1.0  # q = e_0 of each head
                w[d + h * dh, 0] = 40.0  # k[0] = 40 * LN(x)[0]
    x = torch.zeros(3, 24, 24, 24)
    z, y, xx = (8 * v for v in k_zyx)
    x[0, z : z + 8, y : y + 8, xx : xx + 8] = 1.0
    return model, x


@pytest.mark.parametrize("k_zyx", [(2, 0, 1), (0, 2, 2), (1, 1, 0)])
def test_maps_of_a_model_that_attends_to_one_patch_peak_there(k_zyx):
    model, x = attending_model(k_zyx)
    expl = explain(model, x, patch_mm=8.0)
    k = k_zyx[0] * 9 + k_zyx[1] * 3 + k_zyx[2]
    assert expl.last_layer.reshape(-1)[k] > 0.99  # the CLS row concentrates on patch k
    assert int(np.argmax(expl.rollout)) == k
    for which in ("last_layer", "rollout"):
        for mode in ("trilinear", "nearest"):
            up = expl.upsampled(which, mode=mode)
            assert up.shape == (24, 24, 24)
            peak = np.unravel_index(int(np.argmax(up)), up.shape)
            assert tuple(int(v) // 8 for v in peak) == k_zyx, (which, mode, peak)
    # every patch attends only to patch k: its distance is the distance to k's centre
    centres = (np.stack(np.meshgrid(*(np.arange(3),) * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * 8.0
    np.testing.assert_allclose(expl.distance[0, 0], np.linalg.norm(centres - centres[k], axis=1), atol=1e-3)


def test_upsample_nearest_repeats_each_patch():
    grid = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    up = upsample(grid, size=24, mode="nearest")
    np.testing.assert_array_equal(up, np.kron(grid, np.ones((8, 8, 8))))


def test_display_is_radiological(phantom_file):
    """The phantom's bleed sits 25 mm to the patient's right and 10 mm anterior: image left, above centre."""
    x = preprocess(load_volume(phantom_file), config=PreprocessConfig(out_size=48)).numpy()
    brain = x[0]
    zz, yy, xx = np.mgrid[:48, :48, :48] - 23.5
    inside = (xx / 17.5) ** 2 + (yy / 22) ** 2 + (zz / 20) ** 2 < 0.6**2  # well inside the skull (4 mm voxels)
    bleed = inside & (brain > 0.75) & (brain < 0.97)  # 70 HU in the 40/80 window (brain 32 HU = 0.4)
    assert bleed.sum() > 20
    z = int(np.argmax(bleed.sum(axis=(1, 2))))
    rows, cols = np.nonzero(display_slice(bleed, view="axial", index=z))
    assert cols.mean() < 23.5 - 3  # patient right -> image left
    assert rows.mean() < 23.5  # anterior -> up
    y = int(np.argmax(bleed.sum(axis=(0, 2))))
    rows, cols = np.nonzero(display_slice(bleed, view="coronal", index=y))
    assert cols.mean() < 23.5 - 3  # coronal: right on the image left too
    x_ = int(np.argmax(bleed.sum(axis=(0, 1))))
    rows, cols = np.nonzero(display_slice(bleed, view="sagittal", index=x_))
    assert cols.mean() < 23.5  # sagittal: anterior on the left


def panel(png: np.ndarray, box) -> np.ndarray:
    left, top, right, bottom = box
    return png[top + 2 : bottom - 2, left + 2 : right - 2, :3].mean(axis=-1)


def test_figures_have_their_size_and_show_the_head(phantom_file, tmp_path):
    enc = load_encoder("vit-micro")
    x = preprocess(load_volume(phantom_file), config=enc.preprocess)
    expl = explain(enc.model, x, patch_mm=patch_size_mm(vit=enc.model.config, preprocess=enc.preprocess))
    paths = write_explanation(expl, out_dir=tmp_path, windows=enc.preprocess.windows, title="phantom")
    for key in ("last_layer", "rollout", "distance_map"):
        assert imread(paths[key]).shape[:2] == (1300, 1200)
    assert imread(paths["distance_plot"]).shape[:2] == (600, 900)
    saved = json.loads(paths["distance_json"].read_text())
    assert saved["patch_mm"] == 32.0 and len(saved["layers"]) == 4 and len(saved["layers"][0]["heads_mm"]) == 4
    assert saved["layers"][2]["mean_mm"] == pytest.approx(expl.distance[2].mean(), abs=1e-3)

    from hctembed.pictures.attention import render_overlays

    boxes = render_overlays(
        expl.image, expl.upsampled("distance"), windows=enc.preprocess.windows, title="t", out=tmp_path / "c.png",
        through="centre",
    )  # fmt: skip
    png = imread(tmp_path / "c.png")
    brain = panel(png, boxes["0/axial"])
    assert brain.std() > 0.15  # anatomy, not a blank panel
    bone = panel(png, boxes["2/axial"])
    h, w = bone.shape
    rays = 0
    for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False):
        t = np.linspace(0, 0.98, 200)
        profile = bone[(h / 2 - t * h / 2 * np.sin(angle)).astype(int), (w / 2 + t * w / 2 * np.cos(angle)).astype(int)]
        peak = int(np.argmax(profile))
        rays += 0.4 < t[peak] < 0.98 and profile[peak] > profile[0] + 0.25 and profile[peak] > profile[-1] + 0.25
    assert rays >= 14  # the skull: a bright ring around a darker brain, dark air outside


def test_cli_explain_random_init(phantom_file, tmp_path):
    out = tmp_path / "ex"
    result = CliRunner().invoke(
        app, ["explain", str(phantom_file), "--model", "vit-micro", "--out", str(out), "--json", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["patch_mm"] == 32.0 and len(summary["layers"]) == 4
    for f in summary["files"].values():
        assert (out / f.split("/")[-1]).exists()
    bad = CliRunner().invoke(app, ["explain", str(tmp_path / "none.nii.gz"), "--model", "vit-micro", "--out", out])
    assert bad.exit_code == 2
