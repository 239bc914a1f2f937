"""Export a pretrained backbone as an encoder for ``hctembed embed --weights``, with its model card.

``DIR/encoder.safetensors`` + ``DIR/encoder.json`` (config, digest, card). The card (method, data count,
epochs, steps, preprocessing fingerprint, ...) is what ``hctembed embed`` stores in the DuckDB
``models.card`` column.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hctembed.config import ViTConfig
from hctembed.model.checkpoint import CheckpointError, load_state_strict, save_encoder
from hctembed.model.vit3d import ViT3D

ENCODER_FILE = "encoder.safetensors"

# where the backbone lives inside each method's training module
BACKBONE_PREFIX = {"dino": "backbone.", "mae": "encoder.", "simclr": "backbone."}


def export_backbone(backbone: ViT3D, out_dir: str | Path, *, card: Mapping[str, Any]) -> Path:
    """Write ``out_dir/encoder.safetensors`` (+ ``.json``); returns its path."""
    path = Path(out_dir) / ENCODER_FILE
    save_encoder(backbone, path, card=dict(card))
    return path


def backbone_state(state: Mapping[str, torch.Tensor], *, method: str) -> dict[str, torch.Tensor]:
    """The encoder's tensors out of a DINO student/teacher, MAE or SimCLR state dict (prefix stripped)."""
    prefix = BACKBONE_PREFIX[method]
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def export_from_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, which: str = "teacher") -> Path:
    """Export the backbone of a ``hctembed pretrain`` checkpoint (``which``: teacher or student; MAE has
    only its encoder, SimCLR its one network)."""
    ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    if ckpt.get("format") != "hctembed-pretrain":
        raise CheckpointError(f"{checkpoint} is not an hctembed pretraining checkpoint")
    run = json.loads(ckpt["config"])
    method = run["method"]
    key = which if method == "dino" else "student"
    if key not in ckpt:
        raise CheckpointError(f"{checkpoint} holds no {key!r} state")
    model = ViT3D(ViTConfig.from_dict(json.loads(ckpt["vit"])))
    load_state_strict(model, backbone_state(ckpt[key], method=method))
    card = dict(json.loads(ckpt["card"]))
    card["exported_from"] = key
    return export_backbone(model, out_dir, card=card)
