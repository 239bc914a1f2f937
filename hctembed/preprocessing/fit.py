"""The FM-HCT code release's preprocessing ('fmhct-code' preset): foreground box resized to the model grid.

RAS -> 1 mm cubic-spline resample -> bounding box of HU > 0 -> three HU windows -> resize the box to
``out_size``³ without keeping its aspect ratio. Two implementations of one function, as for the paper
preset: :func:`preprocess_fit_reference` (the plain MONAI chain) and :func:`preprocess_fit` (the separable
resample of :mod:`hctembed.preprocessing.resample`, then windows and one ``interpolate`` on the box only).
Both return float32 ``[C, Z, Y, X]``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hctembed.config import FitPreprocessConfig
from hctembed.io.slice_grid import regular
from hctembed.preprocessing.resample import apply_windows, foreground_bounds, isotropic_grid, resample_isotropic
from hctembed.volume import Volume


def preprocess_fit(volume: Volume, *, config: FitPreprocessConfig) -> torch.Tensor:
    """Fast path: ``volume`` (HU ``[Z, Y, X]``) -> float32 ``[C, out, out, out]`` in ``[0, 1]``."""
    grid = isotropic_grid(volume, spacing_mm=config.spacing_mm)
    hu = resample_isotropic(volume, grid=grid)  # [Z1, Y1, X1]
    (x0, y0, z0), (x1, y1, z1) = foreground_bounds(hu, threshold=config.foreground_hu)
    box = apply_windows(hu[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1], windows=config.windows)  # [C, z, y, x]
    size = (config.out_size,) * 3
    kwargs = {} if config.resize_mode in ("area", "nearest") else {"align_corners": False}
    out = F.interpolate(box[None], size=size, mode=config.resize_mode, **kwargs)[0]
    return out.float().contiguous()


def reference_fit_chain(config: FitPreprocessConfig):
    """The 'fmhct-code' preprocessing as a MONAI ``Compose`` over a channel-first MetaTensor ``[1, X, Y, Z]``."""
    from monai.transforms import Compose, CropForeground, Lambda, Orientation, Resize, Spacing

    threshold = config.foreground_hu
    return Compose(
        [
            Orientation(axcodes="RAS"),
            Spacing(pixdim=config.spacing_mm, mode=3, padding_mode="nearest"),
            CropForeground(select_fn=lambda x: x > threshold, margin=0, allow_smaller=True),
            Lambda(lambda img: apply_windows(img[0], windows=config.windows)),
            Resize(spatial_size=(config.out_size,) * 3, mode=config.resize_mode),
        ]
    )


def preprocess_fit_reference(volume: Volume, *, config: FitPreprocessConfig) -> torch.Tensor:
    """The MONAI chain on a Volume; float32 ``[C, out, out, out]`` as ``[C, Z, Y, X]``."""
    from monai.data import MetaTensor

    volume = regular(volume)  # a regular grid (a slice stack blended onto one)
    xyz = np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)
    img = MetaTensor(torch.from_numpy(xyz)[None], affine=torch.from_numpy(volume.affine))
    out = reference_fit_chain(config)(img)
    out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
    return out.float().permute(0, 3, 2, 1).contiguous()
