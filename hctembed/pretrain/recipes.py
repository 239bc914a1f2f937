"""Named pretraining recipes: every setting a published run states, with where each value came from.

``fmhct``: the FM-HCT paper's Methods for DINO and MAE (optimiser, betas, weight decay, base learning rates,
warm-ups, crops, masking), and the official DINO / MAE code's defaults where the paper is silent (teacher
temperatures, drop path, per-parameter clipping, head sizes, the MAE decoder). The peak learning rate follows the
linear rule, base lr x global batch / 256, so a CPU run at batch 8 gets 3e-4 x 8 / 256 = 9.4e-6 for DINO. The
input is standardised per channel, as DINO and MAE feed ImageNet-normalised images (the paper does not say).

A recipe sets values; options the user passes explicitly win and are recorded as ``"user"`` in the card's
``recipe_sources``.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from hctembed.pretrain.mae import MAEConfig
from hctembed.pretrain.settings import PretrainConfig, PretrainError

PAPER = "FM-HCT paper, Methods"
DINO_CODE = "DINO official defaults (facebookresearch/dino main_dino.py)"
MAE_CODE = "MAE official defaults (facebookresearch/mae)"
PRACTICE = "DINO/MAE practice: normalised inputs (the paper is silent)"
RULE = "linear rule: base lr x global batch / 256"

_DINO = {
    "betas": ((0.9, 0.95), PAPER),
    "weight_decay": (0.05, PAPER),
    "warmup_epochs": (5.0, PAPER),
    "local_crops": (3, PAPER),
    "intensity_jitter": (True, PAPER),
    "lr": (None, RULE + " (DINO base 3e-4, the paper's)"),
    "min_lr": (1e-6, DINO_CODE),
    "momentum_teacher": (0.996, DINO_CODE),
    "warmup_teacher_temp": (0.04, DINO_CODE),
    "teacher_temp": (0.04, DINO_CODE),
    "teacher_temp_warmup_epochs": (0.0, DINO_CODE),
    "teacher_temp_max_share": (1.0, DINO_CODE),
    "prototypes": (65536, DINO_CODE),
    "head_hidden": (2048, DINO_CODE),
    "bottleneck": (256, DINO_CODE),
    "head_bn": (False, DINO_CODE),
    "clip_grad": (3.0, DINO_CODE),
    "clip_mode": ("per-parameter", DINO_CODE),
    "freeze_last_layer_epochs": (1, DINO_CODE),
    "drop_path": (0.1, DINO_CODE),
    "centering": ("ema", DINO_CODE),
    "input_norm": ("standardise", PRACTICE),
}
_MAE = {
    "betas": ((0.9, 0.95), PAPER),
    "weight_decay": (0.05, PAPER),
    "lr": (None, RULE + " (MAE base 1.5e-3, the paper's)"),
    "min_lr": (0.0, MAE_CODE),
    "clip_grad": (0.0, MAE_CODE + ": no clipping"),
    "drop_path": (0.0, MAE_CODE),
    "input_norm": ("standardise", PRACTICE),
    "mae": (
        MAEConfig(mask_ratio=0.75, decoder_dim=516, decoder_depth=8, decoder_heads=12, norm_pix_loss=True),
        "mask 0.75 and MSE: " + PAPER + "; decoder 516 x 8 (512 x 8 officially, rounded to a multiple of 6 for the "
        "3D sine-cosine embedding) and per-patch normalised targets: " + MAE_CODE,
    ),
}
RECIPES: dict[str, dict[str, dict[str, tuple[Any, str]]]] = {"fmhct": {"dino": _DINO, "mae": _MAE}}


def apply_recipe(config: PretrainConfig, *, name: str, explicit: set[str]) -> tuple[PretrainConfig, dict[str, str]]:
    """``config`` with recipe ``name``'s values for its method, except the fields in ``explicit`` (what the user
    set); returns it with each recipe field's source (``"user"`` for the explicit ones)."""
    if name not in RECIPES:
        raise PretrainError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    values = RECIPES[name].get(config.method)
    if values is None:
        raise PretrainError(f"recipe {name!r} covers {' and '.join(RECIPES[name])}, not {config.method}")
    known = {f.name for f in fields(PretrainConfig)}
    assert set(values) <= known, sorted(set(values) - known)
    chosen = {k: v for k, (v, _) in values.items() if k not in explicit}
    sources = {k: ("user" if k in explicit else src) for k, (_, src) in values.items()}
    if "mae" in chosen:  # MAE options the user set ("mae.mask_ratio", ...) win inside the recipe's MAE settings
        own = {k.split(".", 1)[1] for k in explicit if k.startswith("mae.")}
        chosen["mae"] = replace(chosen["mae"], **{k: getattr(config.mae, k) for k in own})
        sources |= {f"mae.{k}": "user" for k in own}
    return replace(config, **chosen), sources
