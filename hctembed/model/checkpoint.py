"""Encoder weights on disk: safetensors with the config in its metadata and a JSON file beside it.

Loading is strict: every tensor the model expects must be present with the right shape, and every
tensor in the file must be used. Foreign layouts go through explicit key remaps (a dict of
prefix -> prefix), never ``strict=False``. PyTorch pickles are read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save

from hctembed.config import ViTConfig
from hctembed.errors import HctembedError, InputError, first_line
from hctembed.model.vit3d import ViT3D

log = logging.getLogger(__name__)

FORMAT = "hctembed-vit3d"


class CheckpointError(HctembedError, ValueError):
    """A weights file that cannot be loaded into the encoder; the message names the keys."""


def weights_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors (sorted names, dtypes, shapes, bytes): the same weights give the same
    digest whatever file format or metadata they came in."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_encoder(model: ViT3D, path: str | Path, *, card: Mapping | None = None) -> str:
    """Write ``path`` (.safetensors) and ``path`` with ``.json`` (config + card). Returns the weights digest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.write_bytes(save(tensors, metadata={"format": FORMAT, "config": json.dumps(config)}))
    digest = weights_digest(tensors)
    sidecar = {"format": FORMAT, "config": config, "weights_digest": digest, "card": dict(card or {})}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    return digest


def read_config(path: str | Path) -> ViTConfig:
    """The ViTConfig stored in a safetensors file's metadata (or its JSON sidecar)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    if "config" in meta:
        return config_from_json(meta["config"], where=f"{path.name}'s metadata")
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        return _sidecar_config(path)
    raise CheckpointError(f"{path} carries no encoder config (no metadata 'config', no {sidecar.name})")


def config_from_json(text: str | dict, *, where: str) -> ViTConfig:
    """A ViTConfig from JSON text (or its parsed object), validated as a schema before any model is built: every
    malformed value is a one-line CheckpointError naming ``where`` it came from."""
    try:
        data = json.loads(text) if isinstance(text, str) else text
    except ValueError as exc:
        raise CheckpointError(f"{where} is not valid JSON ({first_line(exc, limit=120)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: the encoder config is a {type(data).__name__}, not a JSON object")
    try:
        return ViTConfig.from_dict(data)
    except InputError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def read_card(path: str | Path) -> dict:
    """The model card in the weights' JSON sidecar (``{}`` when there is none)."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.exists():
        return {}
    try:
        card = json.loads(sidecar.read_text()).get("card") or {}
    except (ValueError, AttributeError):
        raise CheckpointError(f"{sidecar} is not a valid weights sidecar (JSON object with 'card')") from None
    return dict(card)


def remap_keys(state: Mapping[str, torch.Tensor], remap: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Rename keys by prefix (first matching prefix wins; an empty target drops the prefix)."""
    out = {}
    for key, value in state.items():
        for old, new in remap.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


MAX_PARAMETERS = 5_000_000_000  # no encoder here comes near; a file's metadata asking for more is refused


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` read with ``torch.load(weights_only=True)``
    (its ``state_dict`` entry when it has one). A file that is neither, or that holds anything but tensors and
    plain values (a pickle that would run code), is a one-line CheckpointError; nothing in it is executed."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CheckpointError(
                f"{path.name} is not a readable safetensors file: {first_line(exc, limit=200)}"
            ) from None
    state = torch_load_safely(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} holds a {type(state).__name__}, not a dictionary of tensors")
    return state


def torch_load_safely(path: Path):
    """``torch.load(weights_only=True)``: tensors and plain values only; anything else (a pickle that would run
    code, a damaged file) is a one-line CheckpointError and nothing in it is executed."""
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_scalar_globals()):
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not the user's concern
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, zipfile errors
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "WeightsUnpickler" in text:  # torch's own advice (rerun with weights_only=False) is left out
            what = f"objects of {found.group(1)}" if found else "objects other than tensors"
            cause = f"it holds {what}, which only an unsafe load would create (it could run code)"
        else:
            cause = f"damaged or not a PyTorch file ({first_line(exc, limit=120)})"
        raise CheckpointError(
            f"{path.name} cannot be read as weights: {cause}; hctembed loads tensors only. Save the weights as "
            ".safetensors (or a plain state dict) where they were made"
        ) from None


def _numpy_scalar_globals() -> list:
    """What a numpy scalar in a checkpoint's metadata (``best_loss = np.float64(...)``) unpickles through:
    plain data, allowed by name; nothing else is."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return [scalar, np.dtype, *{type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "bool")}]


def check_finite(state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights with NaN or infinite values (they would give NaN embeddings for every scan)."""
    bad = [k for k, t in state.items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]}")


def check_size(config: ViTConfig, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a config that asks for far more than the file holds, before building it: its parameters and
    everything else the model allocates (the fixed position embedding, one token per patch)."""
    from hctembed.model.catalogue import vit_params

    wanted = vit_params(config) + (config.num_patches + 1) * config.dim  # the sine-cosine buffer too
    held = sum(int(t.numel()) for t in state.values() if torch.is_tensor(t))
    if wanted > MAX_PARAMETERS or wanted > 2 * held + 1_000_000:
        raise CheckpointError(
            f"the file's config describes an encoder of {wanted:,} values ({config.image_size}³ input, "
            f"{config.num_patches:,} patches) but the file holds {held:,}"
        )


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with an error that names missing, unexpected and misshaped keys, and a
    refusal of non-finite values."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unexpected:
            parts.append(f"unexpected {unexpected}")
        if misshaped:
            parts.append(f"wrong shape {misshaped}")
        raise CheckpointError("checkpoint does not match the encoder: " + "; ".join(parts))
    not_float = sorted(
        f"{k} ({state[k].dtype})" for k in expected
        if expected[k].is_floating_point() and not state[k].is_floating_point()
    )  # fmt: skip
    if not_float:
        raise CheckpointError(
            f"{len(not_float)} tensor(s) are not floating point, e.g. {not_float[0]}: cast weights would give "
            "meaningless (zero) embeddings"
        )
    check_finite(state)
    model.load_state_dict(dict(state), strict=True)


def load_encoder_weights(path: str | Path, *, remap: Mapping[str, str] | None = None) -> tuple[ViT3D, str]:
    """Build the encoder described by a weights file and load it strictly. Returns (model, weights digest).

    ``.safetensors`` files carry their config; ``.pt``/``.pth`` files are read with
    ``torch.load(weights_only=True)`` and need a ``.json`` sidecar with the config.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    config = read_config(path) if path.suffix == ".safetensors" else _sidecar_config(path)
    state = read_weights(path)
    if remap:
        state = remap_keys(state, remap)
    check_size(config, state)
    model = ViT3D(config)
    load_state_strict(model, state)
    return model.eval(), weights_digest(model.state_dict())


def _sidecar_config(path: Path) -> ViTConfig:
    sidecar = path.with_suffix(".json")
    if not sidecar.exists():
        raise CheckpointError(f"{path} needs a config: write {sidecar.name} or convert to .safetensors")
    try:
        data = json.loads(sidecar.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{sidecar.name} is not valid JSON ({first_line(exc, limit=120)})") from None
    if not isinstance(data, dict) or "config" not in data:
        raise CheckpointError(f"{sidecar.name} has no 'config' object")
    return config_from_json(data["config"], where=sidecar.name)
