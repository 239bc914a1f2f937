"""Other foundation models' own preprocessing (:class:`~hctembed.config.MonaiPreset`) as MONAI chains.

Each adapter in :mod:`hctembed.model.foreign` declares its preset; this module runs it on a Volume.
"""

from __future__ import annotations

import numpy as np
import torch

from hctembed.config import MonaiPreset
from hctembed.io.slice_grid import regular
from hctembed.volume import Volume, VolumeError


def monai_chain(preset: MonaiPreset):
    """The preset as a MONAI ``Compose`` over a channel-first MetaTensor ``[1, X, Y, Z]`` in HU."""
    from monai.transforms import (
        CenterSpatialCrop,
        Compose,
        CropForeground,
        Orientation,
        ScaleIntensityRange,
        Spacing,
        SpatialPad,
    )

    steps: list = [Orientation(axcodes=preset.axcodes)]
    if preset.spacing_mm is not None:
        steps.append(Spacing(pixdim=preset.spacing_mm, mode=preset.spacing_mode))
    lo, hi = preset.hu_range
    steps.append(ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if preset.foreground_hu is not None:
        threshold = (preset.foreground_hu - lo) / (hi - lo)  # on the scaled values
        steps.append(CropForeground(select_fn=lambda x: x > threshold, margin=0, allow_smaller=True))
    if preset.spatial_size is not None:
        steps += [SpatialPad(spatial_size=preset.spatial_size), CenterSpatialCrop(roi_size=preset.spatial_size)]
    return Compose(steps)


def preprocess_monai(volume: Volume, *, config: MonaiPreset) -> torch.Tensor:
    """Volume -> float32 ``[1, D0, D1, D2]`` in the preset's axis order, values in [0, 1]."""
    from monai.data import MetaTensor

    volume = regular(volume)  # a regular grid (a slice stack blended onto one)
    xyz = np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)
    img = MetaTensor(torch.from_numpy(xyz)[None], affine=torch.from_numpy(volume.affine))
    out = monai_chain(config)(img)
    out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
    if out.numel() == 0:
        raise VolumeError(f"{config.name} preprocessing left an empty volume (no foreground?)")
    return out.float().contiguous()
