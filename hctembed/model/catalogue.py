"""Every ``--model`` id with its architecture, input, size, licence, and where its weights come from.

Torch-free, so that ``hctembed models`` lists quickly: the in-repo ViTs are described from their
:data:`~hctembed.config.VIT_PRESETS` (parameter count computed from the config); Merlin and CT-FM from the
facts below, which ``tests/test_models_hub.py`` checks against :data:`hctembed.model.foreign.FOREIGN` and
the instantiated models. :func:`hctembed.model.foreign.find_weights` uses :func:`cached_weights`, so
"present" here means ``--model NAME`` finds the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hctembed.config import FOREIGN_MODELS, VIT_PRESETS, ViTConfig
from hctembed.errors import UnknownNameError

IN_REPO_LICENCE = "Apache-2.0 (hctembed's code)"


@dataclass(frozen=True)
class HubFile:
    """A released weights file on the Hugging Face Hub."""

    repo: str
    filename: str

    @property
    def cache_folder(self) -> str:
        """The repository's folder in a Hugging Face cache (``models--owner--name``)."""
        return "models--" + self.repo.replace("/", "--")

    def __str__(self) -> str:
        return f"{self.repo}/{self.filename}"


@dataclass(frozen=True)
class ModelInfo:
    """One ``--model`` id. ``hub`` is None for hctembed's own architectures (no released weights)."""

    id: str
    architecture: str
    input: str
    params: int
    dim: int
    licence: str
    hub: HubFile | None = None

    @property
    def source(self) -> str:
        return "in-repo" if self.hub is None else f"Hugging Face {self.hub.repo}"


def vit_params(config: ViTConfig) -> int:
    """Trainable parameters of :class:`~hctembed.model.vit3d.ViT3D` for ``config``, without building it."""
    d, m = config.dim, config.mlp_dim
    patch_embed = config.in_channels * config.patch_size**3 * d + d
    tokens = d * (1 + config.register_tokens) + (config.num_patches * d if config.stored_pos_embed else 0)
    attention = d * 3 * d + (3 * d if config.qkv_bias else 0) + d * d + d
    block = 2 * 2 * d + attention + (d * m + m) + (m * d + d)
    return patch_embed + tokens + config.depth * block + 2 * d


def _vit_info(config: ViTConfig) -> ModelInfo:
    p = config.patch_size
    return ModelInfo(
        id=config.name,
        architecture=f"ViT: {config.dim} wide, {config.depth} layers, {config.heads} heads, MLP {config.mlp_dim}",
        input=f"{config.in_channels}×{config.image_size}³ ({config.num_patches} patches of {p}³)",
        params=vit_params(config),
        dim=config.dim,
        licence=IN_REPO_LICENCE,
    )


# Merlin and CT-FM: counts and dims of hctembed.model.foreign.FOREIGN's modules (checked by the tests).
_FOREIGN_INFO: dict[str, ModelInfo] = {
    "merlin": ModelInfo(
        id="merlin",
        architecture="Merlin's image encoder: I3D ResNet-152",
        input="1×224×224×160 (RAS)",
        params=121_882_204,
        dim=2048,
        licence="MIT (Merlin's code); check the model's terms",
        hub=HubFile(
            repo="stanfordmimi/Merlin",
            filename="i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt",
        ),
    ),
    "ct-fm": ModelInfo(
        id="ct-fm",
        architecture="CT-FM: MONAI SegResEncoder (32 filters, blocks 1,2,2,4,4)",
        input="1×192³ (SPL)",
        params=77_760_992,
        dim=512,
        licence="Apache-2.0 (CT-FM's weights)",
        hub=HubFile(repo="project-lighter/ct_fm_feature_extractor", filename="model.safetensors"),
    ),
}

CATALOGUE: dict[str, ModelInfo] = {
    **{name: _vit_info(config) for name, config in VIT_PRESETS.items()},
    **{name: _FOREIGN_INFO[name] for name in FOREIGN_MODELS},
}

PULLABLE: tuple[str, ...] = tuple(name for name, info in CATALOGUE.items() if info.hub is not None)


def model_info(name: str) -> ModelInfo:
    if name not in CATALOGUE:
        raise UnknownNameError(f"unknown model {name!r}; known: {', '.join(CATALOGUE)}")
    return CATALOGUE[name]


def hf_cache_roots() -> list[Path]:
    """The Hugging Face cache folders searched for weights, in huggingface_hub's order of precedence:
    ``$HF_HUB_CACHE`` (or the older ``$HUGGINGFACE_HUB_CACHE``), ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``,
    ``~/.cache/huggingface/hub``."""
    env = os.environ
    roots = [Path(env[k]) for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE") if env.get(k)]
    if env.get("HF_HOME"):
        roots.append(Path(env["HF_HOME"]) / "hub")
    if env.get("XDG_CACHE_HOME"):
        roots.append(Path(env["XDG_CACHE_HOME"]) / "huggingface" / "hub")
    roots.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(roots))


def cached_weights(hub: HubFile) -> Path | None:
    """The newest cached snapshot of ``hub``'s file in the first cache root that has one, else None."""
    for root in hf_cache_roots():
        found = (root / hub.cache_folder / "snapshots").glob(f"*/{hub.filename}")
        hits = sorted((p for p in found if p.exists()), key=lambda p: p.stat().st_mtime)  # not a dangling link
        if hits:
            return hits[-1]
    return None


def weights_status(info: ModelInfo) -> tuple[str, Path | None]:
    """(one-line status, cached weights path or None)."""
    if info.hub is None:
        return "none released: train with `hctembed pretrain` or pass --weights", None
    path = cached_weights(info.hub)
    if path is None:
        return f"missing (hctembed models pull {info.id})", None
    return str(path), path


def catalogue_rows() -> list[dict[str, Any]]:
    """One row per model id, with whether its weights are present locally."""
    rows = []
    for info in CATALOGUE.values():
        status, path = weights_status(info)
        rows.append(
            {
                "model": info.id,
                "architecture": info.architecture,
                "input": info.input,
                "params": info.params,
                "dim": info.dim,
                "licence": info.licence,
                "source": info.source,
                "hub_repo": None if info.hub is None else info.hub.repo,
                "hub_filename": None if info.hub is None else info.hub.filename,
                "weights": status,
                "weights_path": None if path is None else str(path),
            }
        )
    return rows
