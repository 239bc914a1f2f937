"""Volume -> model input. One package, three variants chosen by the config's type:

* :class:`~hctembed.config.PreprocessConfig` - the paper's preprocessing (:mod:`.paper`), which can also run
  while a ``.nii.gz`` is being inflated (:func:`preprocess_stream`);
* :class:`~hctembed.config.FitPreprocessConfig` - the FM-HCT code release's ('fmhct-code', :mod:`.fit`);
* :class:`~hctembed.config.MonaiPreset` - another model's own MONAI chain (Merlin, CT-FM; :mod:`.monai_preset`).

All share :mod:`.resample` (isotropic grid, banded spline products, head box, windows). Every variant has a
fast path (:func:`preprocess`) and a plain-MONAI reference (:func:`preprocess_reference`) that tests hold it to.
(The package is ``preprocessing`` so that ``hctembed.preprocess`` stays the function whatever is imported.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hctembed.config import FitPreprocessConfig, MonaiPreset, PreprocessConfig
from hctembed.preprocessing.fit import preprocess_fit, preprocess_fit_reference
from hctembed.preprocessing.monai_preset import preprocess_monai
from hctembed.preprocessing.paper import preprocess_paper, preprocess_paper_reference, preprocess_stream
from hctembed.preprocessing.threads import intra_op_threads
from hctembed.volume import Volume

AnyPreprocessConfig = PreprocessConfig | FitPreprocessConfig | MonaiPreset


@dataclass(frozen=True)
class Variant:
    """One preprocessing: its fast path, its MONAI reference, and (when it has one) its streamed path."""

    config_type: type
    fast: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]
    stream: Callable[..., torch.Tensor] | None = None


VARIANTS: tuple[Variant, ...] = (
    Variant(PreprocessConfig, preprocess_paper, preprocess_paper_reference, preprocess_stream),
    Variant(FitPreprocessConfig, preprocess_fit, preprocess_fit_reference),
    Variant(MonaiPreset, preprocess_monai, preprocess_monai),  # a MONAI chain is its own reference
)


def variant_of(config: AnyPreprocessConfig) -> Variant:
    """The variant for ``config``'s exact type (a subclass is a different preprocessing, so it must register)."""
    for variant in VARIANTS:
        if type(config) is variant.config_type:
            return variant
    raise TypeError(f"no preprocessing for config type {type(config).__name__}")


def preprocess(
    volume: Volume, *, config: AnyPreprocessConfig, device: torch.device | str | None = None
) -> torch.Tensor:
    """``volume`` (HU ``[Z, Y, X]``) -> model input float32 ``[C, S, S, S]`` (``[C, Z, Y, X]``), fast path, on
    ``device``: the paper preset runs there whole (:func:`preprocess_paper`); the other presets (MONAI chains,
    scipy) run on the CPU and their result moves there."""
    with intra_op_threads():  # see hctembed.preprocessing.threads
        if type(config) is PreprocessConfig:
            return preprocess_paper(volume, config=config, device=device)
        x = variant_of(config).fast(volume, config=config)
    return x.to(device) if device is not None else x


def preprocess_reference(volume: Volume, *, config: AnyPreprocessConfig) -> torch.Tensor:
    """The same as :func:`preprocess` by the plain MONAI chain (slow; the tests' reference)."""
    return variant_of(config).reference(volume, config=config)


def can_stream(config: AnyPreprocessConfig) -> bool:
    """Whether this preprocessing can run slab by slab while a ``.nii.gz`` is being inflated."""
    return variant_of(config).stream is not None


__all__ = [
    "VARIANTS",
    "AnyPreprocessConfig",
    "Variant",
    "can_stream",
    "preprocess",
    "preprocess_reference",
    "preprocess_stream",
    "variant_of",
]
