"""One candidate series (a :class:`~hctembed.io.archive.SeriesRef`) -> model input, by the fastest path its
preprocessing and file allow: streamed while a ``.nii.gz`` inflates where the variant can stream
(:func:`hctembed.preprocessing.can_stream`), else loaded whole first."""

from __future__ import annotations

from typing import Any

import torch

from hctembed.io.archive import SeriesRef, load_series
from hctembed.io.nifti_stream import open_stream
from hctembed.preprocessing import AnyPreprocessConfig, preprocess, variant_of
from hctembed.volume import MAX_VOXELS


def prepare(
    ref: SeriesRef, *, config: AnyPreprocessConfig, max_voxels: int = MAX_VOXELS
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load and preprocess one scan: the model input ``[C, Z, Y, X]`` and PHI-free facts about the source.

    Raises VolumeError with a readable reason (also when its headers claim more than ``max_voxels``).
    """
    streamed = variant_of(config).stream
    use_stream = ref.format == "nifti" and streamed is not None
    stream = open_stream(ref.path, max_voxels=max_voxels) if use_stream else None
    if stream is not None:
        x, source = streamed(stream, config=config), stream
    else:
        volume = load_series(ref, max_voxels=max_voxels)
        x, source = preprocess(volume, config=config), volume
    facts = {
        **source.meta,
        "shape_xyz": list(source.shape_xyz),
        "spacing_xyz": [round(s, 4) for s in source.spacing_xyz],
    }
    return x, facts
