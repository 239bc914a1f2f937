"""Import the official FM-HCT checkpoint (available from its authors on request) into :class:`ViT3D`.

Their layout, taken as facts (no code of theirs is used): optional ``module.`` / ``backbone.`` prefixes;
``patch_embedding.patch_embeddings`` (Conv3d, kernel = stride = patch); ``patch_embedding.position_embeddings``
``[1, N, D]``, a stored tensor added to the patch tokens only; ``cls_token`` prepended after that;
optional ``register_tokens`` right after CLS; blocks with ``att_norm``, ``attn.qkv`` (bias optional),
``attn.proj``, ``ffn_norm``, ``mlp.linear1``/``mlp.linear2`` (exact GELU), pre-norm residuals; a final
``norm`` (eps 1e-6; block norms 1e-5); the embedding is CLS after the final norm. That is exactly
:class:`ViT3D` with ``stored_pos_embed=True``; the key map below is explicit and the load strict.
Their code preprocesses with the 'fmhct-code' preset (``config.PREPROCESS_PRESETS``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from hctembed.config import ViTConfig
from hctembed.model.checkpoint import CheckpointError, load_state_strict, read_weights, save_encoder, torch_load_safely
from hctembed.model.vit3d import ViT3D

log = logging.getLogger(__name__)

PREFIXES = ("_orig_mod.", "module.", "backbone.")  # torch.compile, DataParallel/DDP, the DINO wrapper
HEAD_PREFIXES = ("head.",)  # the DINO projection head (or a fine-tuning classifier): not the encoder
# FM-HCT name -> ViT3D name (block keys: blocks.N.<their part> -> blocks.N.<ours>)
TOP_LEVEL = {
    "patch_embedding.patch_embeddings.weight": "patch_embed.weight",
    "patch_embedding.patch_embeddings.bias": "patch_embed.bias",
    "patch_embedding.position_embeddings": "pos_embed",
    "cls_token": "cls_token",
    "register_tokens": "register_tokens",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}
BLOCK_PARTS = {
    "att_norm.weight": "norm1.weight",
    "att_norm.bias": "norm1.bias",
    "attn.qkv.weight": "attn.qkv.weight",
    "attn.qkv.bias": "attn.qkv.bias",
    "attn.proj.weight": "attn.proj.weight",
    "attn.proj.bias": "attn.proj.bias",
    "ffn_norm.weight": "norm2.weight",
    "ffn_norm.bias": "norm2.bias",
    "mlp.linear1.weight": "mlp.fc1.weight",
    "mlp.linear1.bias": "mlp.fc1.bias",
    "mlp.linear2.weight": "mlp.fc2.weight",
    "mlp.linear2.bias": "mlp.fc2.bias",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
CARD = {"source": "FM-HCT official checkpoint", "preprocess": "fmhct-code"}


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove any leading ``_orig_mod.`` / ``module.`` / ``backbone.`` (repeatedly, in any order)."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p) :], True
        out[key] = value
    return out


def map_fmhct_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FM-HCT names -> ViT3D names. Raises :class:`CheckpointError` naming every key it cannot place."""
    state = strip_prefixes(state)
    out, unmatched = {}, []
    for key, value in state.items():
        if key in TOP_LEVEL:
            out[TOP_LEVEL[key]] = value
            continue
        m = _BLOCK.match(key)
        if m and m.group(2) in BLOCK_PARTS:
            out[f"blocks.{m.group(1)}.{BLOCK_PARTS[m.group(2)]}"] = value
            continue
        unmatched.append(key)
    if unmatched:
        raise CheckpointError(f"FM-HCT checkpoint keys with no place in the encoder: {sorted(unmatched)}")
    return out


def infer_config(state: Mapping[str, torch.Tensor], *, heads: int = 12) -> ViTConfig:
    """The ViTConfig of a (mapped) FM-HCT state dict; ``heads`` cannot be read from the tensors."""
    try:
        conv = state["patch_embed.weight"]  # [D, C, p, p, p]
        pos = state["pos_embed"]  # [1, N, D]
        fc1 = state["blocks.0.mlp.fc1.weight"]  # [mlp, D]
    except KeyError as exc:
        raise CheckpointError(f"FM-HCT checkpoint lacks {exc.args[0]}") from None
    dim, channels, patch = int(conv.shape[0]), int(conv.shape[1]), int(conv.shape[2])
    grid = round(pos.shape[1] ** (1 / 3))
    if grid**3 != pos.shape[1]:
        raise CheckpointError(f"position embeddings for {pos.shape[1]} patches: not a cubic grid")
    depth = 1 + max(int(_BLOCK.match(k).group(1)) for k in state if _BLOCK.match(k))
    registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
    return ViTConfig(
        name="fm-hct",
        image_size=grid * patch,
        patch_size=patch,
        in_channels=channels,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_dim=int(fc1.shape[0]),
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        block_norm_eps=1e-5,
        final_norm_eps=1e-6,
        register_tokens=registers,
        stored_pos_embed=True,
    )


# the entries their training code writes: DINO pretraining {epoch, best_loss, state_dict (the student),
# momentum_model_state_dict (the teacher), optimizer, scheduler}; fine-tuning {..., state_dict} of a
# torch.compile'd model (keys under "_orig_mod."); a flat file is the backbone's tensors alone
ENTRIES = {"teacher": ("momentum_model_state_dict", "teacher"), "student": ("state_dict", "student")}
DEFAULT_ENTRIES = ("momentum_model_state_dict", "teacher", "state_dict", "model")


def _read_state(path: Path, *, entry: str | None) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint layout: a flat file, the teacher (default) or student (``entry``) of a
    DINO checkpoint, or a fine-tuning checkpoint's ``state_dict``; any other layout is refused naming its
    entries. Non-tensor metadata (epochs, numpy losses) is read as data, never as code."""
    if path.suffix == ".safetensors":
        return read_weights(path)  # a damaged file: one line, not safetensors' own error
    obj = torch_load_safely(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a checkpoint dictionary")
    found = ", ".join(sorted(str(k) for k in obj)[:20])
    if entry is None and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    names = ENTRIES.get(entry, (entry,)) if entry is not None else DEFAULT_ENTRIES
    for name in names:
        if isinstance(obj.get(name), Mapping):
            log.info("using the %r entry of %s", name, path.name)
            return dict(obj[name])
    wanted = f"entry {entry!r}" if entry is not None else "a flat state dict or one of " + ", ".join(DEFAULT_ENTRIES)
    raise CheckpointError(
        f"{path.name} is not an FM-HCT checkpoint layout hctembed knows: no {wanted}; it holds {found}"
    )


def load_fmhct(
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    heads: int = 12,
    entry: str | None = None,
    drop_prefixes: tuple[str, ...] = (),
) -> ViT3D:
    """Build a :class:`ViT3D` from an FM-HCT state dict or file (.pth/.pt via ``weights_only``, or
    .safetensors) and load it strictly. ``drop_prefixes`` names parts to leave out on purpose (e.g. a
    training head, ``("head.",)``); anything else that does not map is an error naming the keys."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = Path(source)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        state = _read_state(path, entry=entry)
    state = strip_prefixes(state)
    drop = (*HEAD_PREFIXES, *drop_prefixes)
    dropped = sorted(k for k in state if k.startswith(drop))
    if dropped:
        log.info("left out %d tensors that are not the encoder (%s ...)", len(dropped), dropped[0])
        state = {k: v for k, v in state.items() if not k.startswith(drop)}
    mapped = map_fmhct_keys(state)
    model = ViT3D(infer_config(mapped, heads=heads))
    load_state_strict(model, mapped)
    return model.eval()


def import_fmhct(source: str | Path, out: str | Path, *, heads: int = 12, entry: str | None = None) -> str:
    """Convert an FM-HCT checkpoint to ``out`` (.safetensors + .json, card naming the 'fmhct-code'
    preprocessing) for ``hctembed embed --weights``. Returns the weights digest."""
    model = load_fmhct(source, heads=heads, entry=entry)
    return save_encoder(model, out, card={**CARD, "original": Path(source).name})
