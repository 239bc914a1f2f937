"""Other CT foundation models behind the encoder interface: Merlin and CT-FM.

Each entry declares its architecture, its own preprocessing (:class:`~hctembed.config.MonaiPreset`), its
embedding dim, and where its released weights live. Weights come from a local path (``--weights``) or
a Hugging Face cache (see :mod:`hctembed.model.catalogue`); nothing is downloaded here (``hctembed
models pull`` does that, explicitly), and a missing file is an error naming it. Released checkpoints load
strictly through an explicit key conversion; hctembed's own saves of these models (``.safetensors`` with
the module's keys) load as is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hctembed.config import MonaiPreset
from hctembed.errors import HctembedError
from hctembed.model.catalogue import cached_weights, hf_cache_roots, model_info
from hctembed.model.checkpoint import load_state_strict, read_weights, remap_keys, weights_digest
from hctembed.model.ctfm import CTFM_PREPROCESS, CTFMEncoder
from hctembed.model.merlin import MERLIN_PREPROCESS, MerlinImageEncoder, merlin_state_from_checkpoint


class WeightsNotFound(HctembedError, FileNotFoundError):
    pass


@dataclass(frozen=True)
class ForeignSpec:
    name: str
    build: Callable[[], nn.Module]
    preprocess: MonaiPreset
    dim: int
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # released keys -> module keys


FOREIGN: dict[str, ForeignSpec] = {
    "merlin": ForeignSpec(
        name="merlin",
        build=MerlinImageEncoder,
        preprocess=MERLIN_PREPROCESS,
        dim=2048,
        convert=merlin_state_from_checkpoint,
    ),
    "ct-fm": ForeignSpec(
        name="ct-fm",
        build=CTFMEncoder,
        preprocess=CTFM_PREPROCESS,
        dim=512,
        convert=lambda state: remap_keys(state, {"": "encoder."}),
    ),
}


def find_weights(spec: ForeignSpec, weights: str | Path | None) -> Path:
    """The weights file: ``weights`` when given, else the newest snapshot in a Hugging Face cache (where
    ``hctembed models pull`` puts it; the released file's repository and name are in the catalogue)."""
    if weights is not None:
        path = Path(weights)
        if not path.exists():
            raise WeightsNotFound(f"weights file not found: {path}")
        return path
    hub = model_info(spec.name).hub
    found = cached_weights(hub)
    if found is not None:
        return found
    raise WeightsNotFound(
        f"no weights for {spec.name}: {hub.filename} (Hugging Face {hub.repo}) is not in "
        f"{', '.join(str(r) for r in hf_cache_roots())}; run `hctembed models pull {spec.name}` or pass --weights FILE"
    )


def load_foreign(
    name: str, *, weights: str | Path | None, seed: int, random_init: bool
) -> tuple[nn.Module, str, str | None]:
    """(model in eval mode, weights digest, weights path or None for a random init)."""
    spec = FOREIGN[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build().eval()
    if random_init:
        return model, weights_digest(model.state_dict()), None
    path = find_weights(spec, weights)
    state = read_weights(path)
    own = model.state_dict()
    load_state_strict(model, state if set(state) == set(own) else spec.convert(state))
    return model.eval(), weights_digest(model.state_dict()), str(path.resolve())


def save_foreign(model: nn.Module, path: Path, *, card: dict | None = None) -> None:
    """hctembed's own save of a foreign model: its state dict as safetensors and a JSON card beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"config": model.config.to_dict(), "card": card or {}}, indent=2))
