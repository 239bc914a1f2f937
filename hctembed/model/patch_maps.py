"""Maps over a ViT's patch grid brought to its input grid (attention, attention distance): shared by the
encoder's montage planes and the explanation pictures."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def upsample(grid_map: np.ndarray, *, size: int, mode: str = "trilinear") -> np.ndarray:
    """Patch map ``[g, g, g]`` -> model grid ``[S, S, S]`` (``trilinear`` or ``nearest``)."""
    t = torch.as_tensor(np.ascontiguousarray(grid_map), dtype=torch.float32)[None, None]
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    return F.interpolate(t, size=(size,) * 3, mode=mode, **kwargs)[0, 0].numpy()
