"""Fixed 3D sine-cosine position embeddings (the 2D MAE scheme extended to three axes)."""

from __future__ import annotations

import numpy as np
import torch


def sincos_1d(*, dim: int, positions: np.ndarray) -> np.ndarray:
    """``[len(positions), dim]``: sin on the first half, cos on the second, frequencies 1/10000^(2i/dim)."""
    if dim % 2:
        raise ValueError(f"dim {dim} must be even")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_3d(*, dim: int, grid: int) -> torch.Tensor:
    """Position embedding ``[grid³, dim]`` for patches in ``[Z, Y, X]`` raster order.

    A third of the channels encodes each axis (z, then y, then x). ``dim`` must be a multiple of 6.
    """
    if dim % 6:
        raise ValueError(f"dim {dim} must be a multiple of 6")
    z, y, x = np.meshgrid(np.arange(grid), np.arange(grid), np.arange(grid), indexing="ij")
    third = dim // 3
    emb = np.concatenate(
        [sincos_1d(dim=third, positions=a.reshape(-1)) for a in (z, y, x)],
        axis=1,
    )
    return torch.from_numpy(emb.astype(np.float32))
