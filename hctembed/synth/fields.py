"""Smooth random fields for the synthetic head anatomy.

A :class:`SmoothField` is Gaussian-filtered white noise on a coarse cubic grid (a few mm spacing) centred
on the head, evaluated at arbitrary points ``[N, 3]`` (mm) by trilinear interpolation, so that anatomy
defined on it is the same whatever voxel grid samples it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["SmoothField", "sulcus_distance"]


@dataclass(frozen=True, eq=False)
class SmoothField:
    """A zero-mean, unit-variance smooth random field on a cubic grid centred on the head.

    ``values`` is ``[n, n, n]`` float32 with grid point ``g`` at ``origin_mm + g * step_mm`` on each axis.
    """

    values: np.ndarray
    origin_mm: float
    step_mm: float

    @classmethod
    def sample(
        cls,
        *,
        rng: np.random.Generator,
        half_width_mm: float,
        step_mm: float,
        sigma_mm: float,
    ) -> SmoothField:
        """White noise on the grid, Gaussian-filtered with ``sigma_mm`` and rescaled to unit variance."""
        n = int(np.ceil(2 * half_width_mm / step_mm)) + 1
        noise = rng.standard_normal((n, n, n), dtype=np.float32)
        smooth = ndimage.gaussian_filter(noise, sigma=sigma_mm / step_mm, mode="wrap")
        smooth /= smooth.std() + 1e-12
        return cls(values=smooth, origin_mm=-half_width_mm, step_mm=step_mm)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """Trilinear interpolation at ``pts`` ``[N, 3]`` (mm) -> ``[N]`` float32; clamps outside the grid."""
        coords = (pts.T - np.float32(self.origin_mm)) * np.float32(1.0 / self.step_mm)
        return ndimage.map_coordinates(self.values, coords, order=1, mode="nearest", prefilter=False)


def sulcus_distance(*, rng: np.random.Generator) -> SmoothField:
    """Field whose values approximate the signed distance (mm) to the zero set of a smooth random field."""
    field = SmoothField.sample(rng=rng, half_width_mm=92.0, step_mm=2.0, sigma_mm=3.4)
    grads = np.gradient(field.values, field.step_mm)
    norm = np.sqrt(sum(g * g for g in grads))
    dist = np.clip(field.values / np.maximum(norm, 1e-3), -12.0, 12.0).astype(np.float32)
    return SmoothField(values=dist, origin_mm=field.origin_mm, step_mm=field.step_mm)
