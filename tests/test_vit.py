"""3D ViT: shapes, parameter count, position embedding, normalised embeddings, strict safetensors I/O."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hctembed.config import VIT_PRESETS, ViTConfig
from hctembed.model.checkpoint import CheckpointError, load_encoder_weights, remap_keys, save_encoder
from hctembed.model.encoders import load_encoder
from hctembed.model.pos_embed import sincos_3d
from hctembed.model.vit3d import ViT3D

TINY = ViTConfig(name="test", image_size=24, patch_size=8, dim=48, depth=2, heads=4, mlp_dim=96)


def expected_vit_params(c: ViTConfig) -> int:
    """Count from the architecture's definition, written independently of the module."""
    patch = c.in_channels * c.patch_size**3 * c.dim + c.dim
    block = (
        2 * 2 * c.dim  # two LayerNorms
        + c.dim * 3 * c.dim
        + 3 * c.dim  # qkv
        + c.dim * c.dim
        + c.dim  # proj
        + c.dim * c.mlp_dim
        + c.mlp_dim  # fc1
        + c.mlp_dim * c.dim
        + c.dim  # fc2
    )
    return patch + c.dim + c.register_tokens * c.dim + c.depth * block + 2 * c.dim


def test_vit_base_is_the_papers_model():
    config = VIT_PRESETS["vit-base"]
    assert (config.dim, config.depth, config.heads, config.mlp_dim) == (768, 12, 12, 3072)
    assert (config.image_size, config.patch_size, config.num_patches) == (96, 12, 512)
    with torch.device("meta"):
        model = ViT3D(config)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_vit_params(config)
    assert 88e6 < n < 90e6  # ViT-B/12 in 3D: 89.0M


@pytest.mark.parametrize("name", ["vit-small", "vit-tiny", "vit-micro"])
def test_smaller_presets_count(name):
    config = VIT_PRESETS[name]
    with torch.device("meta"):
        model = ViT3D(config)
    assert sum(p.numel() for p in model.parameters()) == expected_vit_params(config)


def test_shapes_and_normalised_cls():
    model = ViT3D(TINY).eval()
    x = torch.randn(3, 3, 24, 24, 24)
    feats = model.forward_features(x)
    assert feats.shape == (3, 1 + 27, 48)
    cls, patches = model.embed(x, return_patches=True)
    assert cls.shape == (3, 48) and patches.shape == (3, 27, 48)
    torch.testing.assert_close(cls.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(cls, torch.nn.functional.normalize(feats[:, 0], dim=-1))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 16, 16, 16))


def test_register_tokens_are_prefix_tokens():
    config = ViTConfig(name="reg", image_size=24, patch_size=8, dim=48, depth=1, heads=4, mlp_dim=96, register_tokens=2)
    model = ViT3D(config).eval()
    _, patches = model.embed(torch.randn(1, 3, 24, 24, 24), return_patches=True)
    assert patches.shape == (1, 27, 48)
    assert model.forward_features(torch.randn(1, 3, 24, 24, 24)).shape == (1, 30, 48)


def test_attention_path_matches_sdpa_path():
    model = ViT3D(TINY).eval()
    x = torch.randn(2, 3, 24, 24, 24)
    t = model.tokens(x)
    block = model.blocks[0]
    fused = block(t)
    explicit, attn = block(t, return_attention=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))


@pytest.mark.parametrize("registers", [0, 2])
def test_embedding_with_attention_is_the_embedding_and_the_last_cls_row(registers):
    """What embed stores (vector and montage attention) in one pass: the same vector as embed(), and the last
    block's CLS -> patch attention as explain's full attention maps give it."""
    from hctembed.explain import cls_attention

    config = ViTConfig(
        name="t", image_size=24, patch_size=8, dim=48, depth=2, heads=4, mlp_dim=96, register_tokens=registers
    )
    model = ViT3D(config).eval()
    x = torch.randn(3, 3, 24, 24, 24)
    vectors, attention = model.embed_with_attention(x)
    assert torch.equal(vectors, model.embed(x))
    expected = cls_attention(model.attention_maps(x), num_prefix=model.num_prefix_tokens)
    np.testing.assert_allclose(attention.double().numpy(), expected, atol=1e-6)
    assert attention.shape == (3, 27)


def test_patch_order_is_zyx_raster():
    """Patch n covers voxels [z0:z0+p, y0:y0+p, x0:x0+p] with n = (z * g + y) * g + x."""
    config = ViTConfig(name="o", image_size=24, patch_size=8, in_channels=1, dim=6, depth=1, heads=1, mlp_dim=6)
    model = ViT3D(config)
    with torch.no_grad():
        model.patch_embed.weight.zero_()
        model.patch_embed.weight[0, 0] = 1.0 / 512  # channel 0 = mean of the patch
        model.patch_embed.bias.zero_()
        model.pos_embed.zero_()
    x = torch.zeros(1, 1, 24, 24, 24)
    x[0, 0, 8:16, 0:8, 16:24] = 1.0  # z block 1, y block 0, x block 2
    tokens = model.tokens(x)[0, 1:, 0]
    assert int(tokens.argmax()) == (1 * 3 + 0) * 3 + 2


def test_sincos_embedding_properties():
    pe = sincos_3d(dim=48, grid=4)
    assert pe.shape == (64, 48)
    # every position distinct; each third depends on one axis only (x varies fastest)
    assert torch.cdist(pe, pe).add(torch.eye(64) * 10).min() > 0.1
    torch.testing.assert_close(pe[48, 32:], pe[0, 32:])  # (z=3, y=0, x=0) shares the x-part of (0, 0, 0)
    assert not torch.allclose(pe[48, :16], pe[0, :16])  # but not the z-part
    torch.testing.assert_close(pe[1, :16], pe[0, :16])  # z-part same for x=0 and x=1
    torch.testing.assert_close(pe[1, 16:32], pe[0, 16:32])  # y-part same too
    assert not torch.allclose(pe[1, 32:], pe[0, 32:])
    with pytest.raises(ValueError):
        sincos_3d(dim=50, grid=4)


def test_config_validation():
    with pytest.raises(ValueError, match="divide"):
        ViTConfig(image_size=96, patch_size=10)
    with pytest.raises(ValueError, match="heads"):
        ViTConfig(dim=768, heads=7)
    with pytest.raises(ValueError, match="unknown"):
        ViTConfig.from_dict({"dim": 768, "colour": "blue"})


def test_safetensors_round_trip_is_exact(tmp_path):
    model = ViT3D(TINY).eval()
    path = tmp_path / "enc.safetensors"
    digest = save_encoder(model, path, card={"method": "none"})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["config"] == TINY.to_dict() and sidecar["weights_digest"] == digest
    loaded, digest2 = load_encoder_weights(path)
    assert digest2 == digest
    x = torch.randn(2, 3, 24, 24, 24)
    torch.testing.assert_close(loaded.embed(x), model.embed(x), atol=0, rtol=0)
    assert "pos_embed" not in load_file(str(path))  # fixed, rebuilt from the config


def test_strict_loading_names_bad_keys(tmp_path):
    model = ViT3D(TINY)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "bad.safetensors"
    meta = {"format": "hctembed-vit3d", "config": json.dumps(TINY.to_dict())}
    broken = dict(state)
    del broken["blocks.1.mlp.fc2.weight"]
    broken["head.weight"] = torch.zeros(2, 2)
    save_file(broken, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing \['blocks.1.mlp.fc2.weight'\].*unexpected \['head.weight'\]"):
        load_encoder_weights(path)
    wrong = dict(state)
    wrong["cls_token"] = torch.zeros(1, 1, 24)
    save_file(wrong, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"wrong shape.*cls_token"):
        load_encoder_weights(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder_weights(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_encoder_weights(tmp_path / "junk.safetensors")


def test_torch_pickle_needs_weights_only_and_remaps(tmp_path):
    model = ViT3D(TINY)
    prefixed = {"module." + k: v for k, v in model.state_dict().items()}
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": prefixed}, path)
    path.with_suffix(".json").write_text(json.dumps({"config": TINY.to_dict()}))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_encoder_weights(path)
    loaded, _ = load_encoder_weights(path, remap={"module.": ""})
    x = torch.randn(1, 3, 24, 24, 24)
    torch.testing.assert_close(loaded.embed(x), model.eval().embed(x))
    assert remap_keys({"backbone.a": 1, "b": 2}, {"backbone.": ""}) == {"a": 1, "b": 2}


def test_random_init_is_deterministic_and_ids_differ_by_weights(tmp_path):
    a = load_encoder("vit-micro", seed=0)
    b = load_encoder("vit-micro", seed=0)
    c = load_encoder("vit-micro", seed=1)
    assert a.model_id == b.model_id != c.model_id
    x = torch.rand(1, 3, 48, 48, 48)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))
    path = tmp_path / "micro.safetensors"
    save_encoder(a.model, path)
    assert load_encoder("vit-micro", weights=path).model_id == a.model_id
    with pytest.raises(ValueError, match="takes 48"):
        load_encoder("vit-base", weights=path)
    with pytest.raises(KeyError, match="unknown model"):
        load_encoder("resnet-9000")
