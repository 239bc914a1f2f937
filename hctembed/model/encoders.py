"""Encoder registry: each entry names a model architecture and the preprocessing it expects.

``load_encoder(name)`` gives a ready :class:`Encoder` (random-initialised from a seed, or from a weights
file). Its ``model_id`` is the architecture name plus the first 12 hex digits of the weights digest, so
two different weight files never share an id.

A random-initialised encoder is never written to disk: its card records ``{"init": "random", "seed": S}``, and
:func:`rebuild_encoder` builds it again from the architecture and seed, checked bit for bit against the
stored digest (which the model id carries). Only trained or imported weights live in files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hctembed.config import PREPROCESS_PRESETS, VIT_PRESETS, FitPreprocessConfig, PreprocessConfig, ViTConfig
from hctembed.errors import InputError, UnknownNameError
from hctembed.model.checkpoint import load_encoder_weights, read_card, weights_digest
from hctembed.model.vit3d import ViT3D

log = logging.getLogger(__name__)

DEFAULT_MODEL = "vit-base"


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    vit: ViTConfig
    preprocess: PreprocessConfig


def _spec(name: str) -> EncoderSpec:
    vit = VIT_PRESETS[name]
    return EncoderSpec(name=name, vit=vit, preprocess=PreprocessConfig(out_size=vit.image_size))


REGISTRY: dict[str, EncoderSpec] = {name: _spec(name) for name in VIT_PRESETS}


@dataclass(frozen=True, eq=False)
class Encoder:
    """A loaded encoder: the torch module, its preprocessing, and its identity."""

    name: str
    model_id: str
    model: ViT3D
    preprocess: PreprocessConfig | FitPreprocessConfig
    weights_digest: str
    weights_path: str | None
    card: dict | None = None  # the weights' model card (JSON sidecar), stored in the models table

    @property
    def dim(self) -> int:
        return self.model.config.dim

    @property
    def fingerprint(self) -> str:
        """The preprocessing's fingerprint; with ``+standardise`` when the encoder centres its input itself."""
        return with_input_norm(self.preprocess.fingerprint(), self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, batch: torch.Tensor) -> np.ndarray:
        """``[B, C, Z, Y, X]`` -> L2-normalised float32 ``[B, dim]``."""
        device = next(self.model.parameters()).device
        return self.model.embed(batch.to(device)).float().cpu().numpy()

    @torch.inference_mode()
    def encode_with_planes(self, batch: torch.Tensor) -> tuple[np.ndarray, list[bytes] | None]:
        """:meth:`encode` and, for the ViTs, each scan's montage planes
        (:class:`hctembed.pictures.montage.PanelPlanes` as bytes: the brain window's mid planes and the last
        layer's CLS attention), from the same forward pass; None for models without attention maps."""
        device = next(self.model.parameters()).device
        if not hasattr(self.model, "embed_with_attention"):
            return self.encode(batch), None
        from hctembed.model.patch_maps import upsample
        from hctembed.pictures.montage import PanelPlanes

        vectors, attention = self.model.embed_with_attention(batch.to(device))
        g, size = round(attention.shape[1] ** (1 / 3)), batch.shape[-1]
        maps = attention.double().cpu().numpy().reshape(-1, g, g, g)
        planes = [
            PanelPlanes.of(batch[i, 0].cpu().numpy(), upsample(maps[i], size=size)).to_bytes() for i in range(len(maps))
        ]
        return vectors.float().cpu().numpy(), planes

    def to(self, device: str) -> Encoder:
        self.model.to(device)
        return self


def with_input_norm(fingerprint: str, model: torch.nn.Module) -> str:
    """``fingerprint`` marked with the model's input norm (a ViT3D that standardises its input): vectors of a
    standardising encoder never share a fingerprint with those of the same preprocessing fed raw."""
    norm = getattr(getattr(model, "config", None), "input_norm", "none")
    return fingerprint if norm == "none" else f"{fingerprint}+{norm}"


def check_model_name(name: str) -> None:
    """Refuse an unknown ``--model`` name (UnknownNameError, listing the known ones) before any work starts."""
    from hctembed.model.foreign import FOREIGN

    if name not in REGISTRY and name not in FOREIGN:
        known = sorted(REGISTRY) + sorted(FOREIGN)
        raise UnknownNameError(f"unknown model {name!r}; known: {', '.join(known)}")


def load_encoder(
    name: str = DEFAULT_MODEL, *, weights: str | Path | None = None, seed: int = 0, random_init: bool | None = None
) -> Encoder:
    """Build an encoder by registry name; load ``weights`` (safetensors) strictly, or init from ``seed``.

    Merlin and CT-FM (:mod:`hctembed.model.foreign`) look for their released weights in the Hugging Face
    cache when ``weights`` is None, unless ``random_init`` (tests, speed benchmarks).

    With ``weights``, the file's stored config decides the architecture; ``name`` only picks the
    preprocessing and must agree with the file's image size.
    """
    from hctembed.model.foreign import FOREIGN, load_foreign

    if name in FOREIGN:  # another foundation model with its own preprocessing (Merlin, CT-FM)
        model, digest, path = load_foreign(name, weights=weights, seed=seed, random_init=random_init)
        return Encoder(
            name=name,
            model_id=f"{name}-{digest[:12]}",
            model=model,
            preprocess=FOREIGN[name].preprocess,
            weights_digest=digest,
            weights_path=path,
            card=random_init_card(seed) if path is None else None,
        )
    check_model_name(name)
    spec = REGISTRY[name]
    if weights is not None:
        model, sha = load_encoder_weights(weights)
        if model.config.image_size != spec.preprocess.out_size:
            raise InputError(
                f"{weights} takes {model.config.image_size}³ input but model {name} preprocesses to "
                f"{spec.preprocess.out_size}³; pass the matching --model"
            )
        weights_path: str | None = str(Path(weights).resolve())
        card = read_card(weights)
        preset = card.get("preprocess")
        if preset and preset != "paper":  # e.g. imported FM-HCT weights: 'fmhct-code'
            if preset not in PREPROCESS_PRESETS:
                raise InputError(f"{weights} asks for preprocessing {preset!r}; known: {', '.join(PREPROCESS_PRESETS)}")
            spec = replace(spec, preprocess=replace(PREPROCESS_PRESETS[preset], out_size=model.config.image_size))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ViT3D(spec.vit).eval()
        sha = weights_digest(model.state_dict())
        weights_path = None
        card = random_init_card(seed)
    return Encoder(
        name=name,
        model_id=f"{name}-{sha[:12]}",
        model=model,
        preprocess=spec.preprocess,
        weights_digest=sha,
        weights_path=weights_path,
        card=card,
    )


def random_init_card(seed: int) -> dict:
    """The card of a random-initialised encoder: all :func:`rebuild_encoder` needs besides the architecture."""
    return {"init": "random", "seed": int(seed)}


def rebuild_encoder(*, name: str, model_id: str, weights_path: str | None, card: dict | None) -> Encoder:
    """The encoder a stored model row describes: loaded from its weights file, or (random initialisation)
    built again from its architecture and seed. Refuses (InputError) unless the result is bit for bit
    the model stored: its digest, hence its ``model_id``, must match."""
    card = card or {}
    if weights_path:
        if not Path(weights_path).exists():
            raise InputError(f"weights of {model_id} not found at {weights_path}")
        encoder = load_encoder(name, weights=weights_path)
        where = f"weights at {weights_path} are"
    elif card.get("init") == "random" and isinstance(card.get("seed"), int):
        encoder = load_encoder(name, seed=card["seed"], random_init=True)
        where = f"{name} random-initialised from seed {card['seed']} is"
    else:
        raise InputError(f"model {model_id} has no weights file and no seed recorded; cannot rebuild its encoder")
    if encoder.model_id != model_id:
        raise InputError(
            f"{where} now model {encoder.model_id}, but the database holds model {model_id} "
            "(a different torch build can draw other random weights: embed again, or pass trained --weights)"
        )
    return encoder
