"""FM-HCT checkpoint import: their key names onto ViT3D, the same CLS as a direct re-statement of their
computation, strict loading with unmatched keys named; the 'fmhct-code' preprocessing preset."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hctembed.config import PREPROCESS_PRESETS, FitPreprocessConfig, PreprocessConfig
from hctembed.io.nifti import load_nifti
from hctembed.model.checkpoint import CheckpointError, load_encoder_weights, read_card
from hctembed.model.fmhct import import_fmhct, load_fmhct
from hctembed.preprocessing import preprocess, preprocess_reference

DIM, PATCH, GRID, DEPTH, HEADS, MLP = 48, 4, 3, 2, 4, 96


def their_state(*, registers: int, qkv_bias: bool, prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    s = {
        "patch_embedding.patch_embeddings.weight": r(DIM, 3, PATCH, PATCH, PATCH),
        "patch_embedding.patch_embeddings.bias": r(DIM),
        "patch_embedding.position_embeddings": r(1, GRID**3, DIM),
        "cls_token": r(1, 1, DIM),
        "norm.weight": 1 + r(DIM),
        "norm.bias": r(DIM),
    }
    if registers:
        s["register_tokens"] = r(1, registers, DIM)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        s |= {
            b + "att_norm.weight": 1 + r(DIM),
            b + "att_norm.bias": r(DIM),
            b + "attn.qkv.weight": r(3 * DIM, DIM),
            b + "attn.proj.weight": r(DIM, DIM),
            b + "attn.proj.bias": r(DIM),
            b + "ffn_norm.weight": 1 + r(DIM),
            b + "ffn_norm.bias": r(DIM),
            b + "mlp.linear1.weight": r(MLP, DIM),
            b + "mlp.linear1.bias": r(MLP),
            b + "mlp.linear2.weight": r(DIM, MLP),
            b + "mlp.linear2.bias": r(DIM),
        }
        if qkv_bias:
            s[b + "attn.qkv.bias"] = r(3 * DIM)
    return {prefix + k: v for k, v in s.items()}


def their_cls(s: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Their computation written out: conv patches + position embeddings, CLS first, registers after CLS,
    pre-norm blocks (LayerNorm 1e-5, softmax attention, exact GELU), final LayerNorm 1e-6, CLS out."""
    t = F.conv3d(
        x, s["patch_embedding.patch_embeddings.weight"], s["patch_embedding.patch_embeddings.bias"], stride=PATCH
    )
    t = t.flatten(2).transpose(1, 2) + s["patch_embedding.position_embeddings"]
    b = x.shape[0]
    parts = [s["cls_token"].expand(b, -1, -1)]
    if "register_tokens" in s:
        parts.append(s["register_tokens"].expand(b, -1, -1))
    t = torch.cat([*parts, t], dim=1)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(t, (DIM,), s[p + "att_norm.weight"], s[p + "att_norm.bias"], eps=1e-5)
        qkv = F.linear(h, s[p + "attn.qkv.weight"], s.get(p + "attn.qkv.bias"))
        q, k, v = qkv.reshape(b, t.shape[1], 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (DIM // HEADS) ** 0.5, dim=-1) @ v
        t = t + F.linear(a.transpose(1, 2).reshape(b, -1, DIM), s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        h = F.layer_norm(t, (DIM,), s[p + "ffn_norm.weight"], s[p + "ffn_norm.bias"], eps=1e-5)
        h = F.linear(h, s[p + "mlp.linear1.weight"], s[p + "mlp.linear1.bias"])
        h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
        t = t + F.linear(h, s[p + "mlp.linear2.weight"], s[p + "mlp.linear2.bias"])
    return F.layer_norm(t, (DIM,), s["norm.weight"], s["norm.bias"], eps=1e-6)[:, 0]


@pytest.mark.parametrize(
    ("registers", "qkv_bias", "prefix"), [(0, True, ""), (2, True, "module."), (3, False, "module.backbone.")]
)
def test_same_cls_as_their_computation(registers, qkv_bias, prefix):
    state = their_state(registers=registers, qkv_bias=qkv_bias, prefix=prefix)
    model = load_fmhct(state, heads=HEADS)
    assert model.config.register_tokens == registers and model.config.qkv_bias == qkv_bias
    assert model.config.image_size == GRID * PATCH and model.config.final_norm_eps == 1e-6
    x = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(9))
    plain = {k[len(prefix) :]: v for k, v in state.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), their_cls(plain, x), rtol=1e-4, atol=1e-5)


def test_unmatched_and_missing_keys_are_named():
    state = their_state(registers=0, qkv_bias=True)
    state["head.weight"] = torch.zeros(2, DIM)
    state["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"no place in the encoder: \['blocks\.0\.attn\.extra'\]$"):
        load_fmhct(state, heads=HEADS)  # the head is left out by name, the unknown key is named
    del state["blocks.0.attn.extra"]
    load_fmhct(state, heads=HEADS, drop_prefixes=("head.",))  # dropped on purpose: fine
    state.pop("head.weight")
    del state["blocks.1.ffn_norm.bias"]
    with pytest.raises(CheckpointError, match=r"blocks\.1\.norm2\.bias"):
        load_fmhct(state, heads=HEADS)


def test_import_writes_an_encoder_file_with_its_preset(tmp_path):
    state = their_state(registers=2, qkv_bias=True, prefix="module.")
    src = tmp_path / "fmhct.pth"
    torch.save({"teacher": state, "epoch": 300}, src)
    out = tmp_path / "fmhct.safetensors"
    import_fmhct(src, out, heads=HEADS)
    model, _ = load_encoder_weights(out)
    assert model.config.stored_pos_embed and "pos_embed" in model.state_dict()
    torch.testing.assert_close(model.pos_embed, state["module.patch_embedding.position_embeddings"])
    assert read_card(out)["preprocess"] == "fmhct-code"
    assert json.loads(out.with_suffix(".json").read_text())["config"]["register_tokens"] == 2


def test_fmhct_code_preset_fast_path_agrees_with_monai(phantom_file):
    config = PREPROCESS_PRESETS["fmhct-code"]
    assert isinstance(config, FitPreprocessConfig) and config.foreground_hu == 0
    volume = load_nifti(phantom_file)
    fast = preprocess(volume, config=config)
    ref = preprocess_reference(volume, config=config)
    assert fast.shape == ref.shape == (3, 96, 96, 96)
    assert float((fast - ref).abs().mean()) < 0.01
    assert config.fingerprint() != PreprocessConfig().fingerprint()
    assert PREPROCESS_PRESETS["paper"] == PreprocessConfig()


def _flat_cls(state, x):
    return load_fmhct({k: v for k, v in state.items()}, heads=HEADS).embed(x)


def test_every_layout_their_code_writes_imports_to_the_model_of_the_same_tensors(tmp_path):
    """Their DINO checkpoint (teacher by default, --entry student), their torch.compile'd fine-tuning checkpoint
    with a numpy loss in its metadata, and a flat backbone file: each imports to the model the same tensors make
    as a flat file; the DINO head is left out by name; any other layout is refused naming its entries."""
    import numpy as np

    from hctembed.model.fmhct import ENTRIES  # noqa: F401  (the names the CLI documents)

    x = torch.randn(2, 3, PATCH * GRID, PATCH * GRID, PATCH * GRID)
    teacher = their_state(registers=4, qkv_bias=True, seed=1)
    student = their_state(registers=4, qkv_bias=True, seed=2)
    head = {"head.mlp.0.weight": torch.randn(8, DIM), "head.last_layer.weight_g": torch.ones(16, 1)}

    def wrapped(state, prefix):
        return {f"{prefix}{k}": v for k, v in {**{f"backbone.{k}": v for k, v in state.items()}, **head}.items()}

    dino = tmp_path / "checkpoint.pth"
    torch.save(
        {"epoch": 99, "best_loss": np.float64(3.21), "state_dict": wrapped(student, "module."),
         "momentum_model_state_dict": wrapped(teacher, "module."), "optimizer": {"state": {}}, "scheduler": {}},
        dino,
    )  # fmt: skip
    torch.testing.assert_close(load_fmhct(dino, heads=HEADS).embed(x), _flat_cls(teacher, x), rtol=0, atol=0)
    for entry in ("teacher", "momentum_model_state_dict"):
        torch.testing.assert_close(load_fmhct(dino, heads=HEADS, entry=entry).embed(x), _flat_cls(teacher, x))
    torch.testing.assert_close(load_fmhct(dino, heads=HEADS, entry="student").embed(x), _flat_cls(student, x))
    compiled = tmp_path / "finetune.pth"
    torch.save({"epoch": 3, "best_loss": np.float64(0.12), "state_dict": wrapped(student, "_orig_mod.")}, compiled)
    torch.testing.assert_close(load_fmhct(compiled, heads=HEADS).embed(x), _flat_cls(student, x), rtol=0, atol=0)
    flat = tmp_path / "backbone.pth"
    torch.save({f"module.backbone.{k}": v for k, v in teacher.items()}, flat)
    torch.testing.assert_close(load_fmhct(flat, heads=HEADS).embed(x), _flat_cls(teacher, x), rtol=0, atol=0)
    other = tmp_path / "other.pth"
    torch.save({"weights": teacher, "epoch": 1}, other)
    with pytest.raises(CheckpointError, match=r"no a flat state dict or one of .*it holds epoch, weights"):
        load_fmhct(other, heads=HEADS)
    with pytest.raises(CheckpointError, match=r"no entry 'ema'"):
        load_fmhct(dino, heads=HEADS, entry="ema")


def test_import_fmhct_command_reports_the_head_it_leaves_out(tmp_path):
    import subprocess
    import sys

    state = {f"module.backbone.{k}": v for k, v in their_state(registers=0, qkv_bias=True).items()}
    state["module.head.last_layer.weight"] = torch.zeros(4, DIM)
    src = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": state, "momentum_model_state_dict": state, "epoch": 1}, src)
    run = subprocess.run(
        [sys.executable, "-m", "hctembed.cli", "import-fmhct", str(src), "--out", str(tmp_path / "o.safetensors"),
         "--heads", str(HEADS)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "momentum_model_state_dict" in run.stderr and "left out 1 tensors" in run.stderr
