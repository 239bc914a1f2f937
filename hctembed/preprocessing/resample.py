"""The resampling every preprocessing shares: MONAI's isotropic grid, separable cubic-spline weights kept as
banded blocks, the slab-wise resample, the head's bounding box and the HU windows.

MONAI's ``Spacing`` keeps the scan's own axes (only the voxel size changes), so the isotropic grid is
axis-aligned with the RAS-oriented source in index space (:class:`IsotropicGrid`), oblique scans included,
and the 3D cubic-spline resample is the product of three 1D spline-interpolation matrices
(:func:`spline_weights`), applied as matrix products straight from the file's buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import spline_filter1d

from hctembed.config import Window
from hctembed.rescale import StoredValues
from hctembed.volume import Volume, VolumeError


@dataclass(frozen=True)
class IsotropicGrid:
    """The grid MONAI's ``Spacing(pixdim=t)`` resamples onto, in the RAS volume's index space.

    Grid voxel ``p`` (per axis x, y, z) sits at volume index ``u = scale * p + shift``: the scan keeps its
    own axes (oblique ones included), so the map is diagonal and the resample is separable.
    """

    shape: np.ndarray  # (x, y, z) int
    scale: np.ndarray  # (x, y, z)
    shift: np.ndarray  # (x, y, z)

    def source_positions(self, *, axis: int, grid_index: np.ndarray) -> np.ndarray:
        return self.scale[axis] * grid_index + self.shift[axis]


def isotropic_grid(volume: Volume, *, spacing_mm: float) -> IsotropicGrid:
    """MONAI's own geometry rule (``zoom_affine`` + ``compute_shape_offset``), so both paths share one grid."""
    return grid_for(affine=volume.affine, shape_xyz=volume.shape_xyz, spacing_mm=spacing_mm)


def grid_for(*, affine: np.ndarray, shape_xyz: tuple[int, int, int], spacing_mm: float) -> IsotropicGrid:
    """:func:`isotropic_grid` from a RAS ``affine`` and shape alone (no voxels needed)."""
    affine = np.asarray(affine, dtype=np.float64)
    out_affine = spacing_affine(affine, spacing_mm=spacing_mm)
    shape, offset = grid_shape_offset(shape_xyz, in_affine=affine, out_affine=out_affine)
    out_affine[:3, 3] = offset
    grid_to_volume = np.linalg.solve(affine, out_affine)
    linear = grid_to_volume[:3, :3]
    if not np.allclose(linear, np.diag(np.diag(linear)), atol=1e-6):
        raise VolumeError("internal: the isotropic grid is not axis-aligned with the scan")
    return IsotropicGrid(
        shape=np.asarray(shape, np.int64), scale=np.diag(linear).copy(), shift=grid_to_volume[:3, 3].copy()
    )


def spacing_affine(affine: np.ndarray, *, spacing_mm: float) -> np.ndarray:
    """The output affine of MONAI's ``Spacing``: the scan's rotation (its shear dropped) with every voxel side
    ``spacing_mm``, no translation. ``A = R Z`` with ``Z`` upper triangular (Cholesky of ``A^T A``); the new
    linear part is ``R diag(sign(diag Z) * spacing)``. Agrees with ``monai.data.utils.zoom_affine`` (tested)
    without importing MONAI, whose import costs seconds on every process that only searches."""
    linear = affine[:3, :3]
    upper = np.linalg.cholesky(linear.T @ linear).T
    rotation = linear @ np.linalg.inv(upper)
    out = np.eye(4)
    out[:3, :3] = rotation @ np.diag(np.sign(np.diag(upper)) * spacing_mm)
    return out


def grid_shape_offset(
    shape_xyz: tuple[int, int, int], *, in_affine: np.ndarray, out_affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Shape and world origin of the output grid that covers the input's voxel centres (MONAI's
    ``compute_shape_offset`` rule, tested against it): the shape spans the input's corner voxels mapped into the
    output grid, rounded; the origin is the input corner that is smallest along every output axis, or,
    when no corner is (an oblique grid), the one that keeps the two grids' centres together."""
    shape = np.asarray(shape_xyz, dtype=np.float64)
    corners = np.array(np.meshgrid(*[(0.0, n - 1.0) for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones((1, corners.shape[1]))])
    in_grid = np.linalg.solve(out_affine, in_affine) @ corners  # [4, 8] corners in output voxel units
    world = in_affine @ corners
    out_shape = np.round(np.ptp(in_grid[:3] / in_grid[3], axis=1) + 1.0)
    for i in range(corners.shape[1]):
        if np.allclose(np.min(in_grid[:3] - in_grid[:3, i : i + 1], axis=1), 0.0):
            return out_shape.astype(int), world[:3, i]
    centre = in_affine[:3, :3] @ (shape / 2.0) + in_affine[:3, 3] - out_affine[:3, :3] @ (out_shape / 2.0)
    return out_shape.astype(int), centre


def resampled_shape(volume: Volume, *, spacing_mm: float) -> np.ndarray:
    """Shape (x, y, z) of the isotropic grid: ``round((n - 1) * s / t + 1)`` per axis."""
    return isotropic_grid(volume, spacing_mm=spacing_mm).shape


def foreground_bounds(hu: torch.Tensor, *, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (lo, hi) as (x, y, z) of the voxels of ``hu [Z, Y, X]`` above ``threshold`` (CropForeground).

    Three passes over the volume (the mask, its projection onto the axial plane, and per slice); the x and y
    extents come from the small projected plane."""
    mask = hu > threshold
    plane = mask.any(dim=0)  # [Y, X]
    profiles = (plane.any(dim=0), plane.any(dim=1), mask.flatten(1).any(dim=1))  # x, y, z
    lo, hi = [], []
    for profile in profiles:
        hits = torch.nonzero(profile).flatten()
        if hits.numel() == 0:
            raise VolumeError(f"no voxel above {threshold:g} HU: no head in the field of view")
        lo.append(int(hits[0]))
        hi.append(int(hits[-1]))
    return np.array(lo, np.int64), np.array(hi, np.int64)


def resample_isotropic(
    volume: Volume, *, grid: IsotropicGrid, device: torch.device | str | None = None
) -> torch.Tensor:
    """Cubic-spline resample onto ``grid``: float32 HU ``[Z1, Y1, X1]`` by three 1D matrix products, on
    ``device`` (the volume's voxels are copied there once; default the CPU). A volume of stored values
    (``volume.stored``) is converted to HU slab by slab as it is read: the same numbers as its ``array``'s."""
    voxels = volume.voxels
    stored = voxels if isinstance(voxels, StoredValues) else None  # (HU already held is read as it is)
    array = voxels if stored is None else stored.values
    flips = tuple(array.strides[axis] < 0 for axis in range(3))
    for axis, flip in enumerate(flips):
        if flip:  # a flipped view: read the buffer forwards (the weights are reversed instead)
            array = np.flip(array, axis=axis)
    if not array.flags.c_contiguous:  # e.g. a sagittal acquisition: one copy beats strided products
        array = np.ascontiguousarray(array)
    weights = memory_weights(shape_zyx=array.shape, flips_zyx=flips, grid=grid)
    if device is not None and torch.device(device).type != "cpu":
        weights = tuple(w.to(device) for w in weights)
    # on the CPU slab by slab, as a streamed file: the in-plane intermediates stay a few MB (in cache) instead of
    # the whole volume's (80 MB for 170 slices of 512²); a GPU takes the volume in one copy and one product
    step = array.shape[0] if device is not None and torch.device(device).type != "cpu" else SLAB_SLICES
    if stored is None:
        slabs = ((i, array[i : i + step]) for i in range(0, array.shape[0], step))
    else:
        slabs = ((i, stored.rescale.hu(array[i : i + step])) for i in range(0, array.shape[0], step))
    return resample_slabs(slabs, weights=weights, n_slices=array.shape[0], device=device)


def resample_stack(volume: Volume, *, grid: IsotropicGrid, device: torch.device | str | None = None) -> torch.Tensor:
    """One interpolation from a stack's true slice positions (:class:`hctembed.volume.SliceStack`: slice zones,
    gantry tilt) onto ``grid``: float32 HU ``[Z1, Y1, X1]``. In-plane, each slice gets MONAI's cubic-spline weights
    at the grid's positions less its own shift; along z, the cubic spline through the slices at each grid position's
    fractional slice index (linear in true distance between the two slices around it). Nothing is first put on an
    intermediate grid."""
    stack = volume.stack
    array = np.asarray(volume.array, dtype=np.float32)
    n, ny, nx = array.shape
    pos = [grid.source_positions(axis=a, grid_index=np.arange(int(grid.shape[a]))) for a in range(3)]  # x, y, z
    inplane = torch.empty((n, int(grid.shape[1]), int(grid.shape[0])), dtype=torch.float32, device=device)
    for k in range(n):
        wy = _axis_weights(ny, np.ascontiguousarray(pos[1] - stack.shifts[k, 0]).tobytes(), False)
        wx = _axis_weights(nx, np.ascontiguousarray(pos[0] - stack.shifts[k, 1]).tobytes(), False)
        if device is not None and torch.device(device).type != "cpu":
            wy, wx = wy.to(device), wx.to(device)
        src = torch.from_numpy(np.ascontiguousarray(array[k : k + 1])).to(device or "cpu")
        inplane[k] = wy.along_rows(wx.along_last(src))[0]
    # each grid position as a fractional slice index (linear between the true positions of the slices around it),
    # then MONAI's cubic spline along the slices: exactly MONAI's along z for evenly spaced slices, and through
    # every slice's own values for zones
    index = np.interp(pos[2], stack.positions, np.arange(n, dtype=np.float64))
    wz = torch.from_numpy(spline_weights(n=n, positions=index).astype(np.float32)).to(device or "cpu")
    return (wz @ inplane.reshape(n, -1)).reshape(wz.shape[0], *inplane.shape[1:])


def isotropic_volume(volume: Volume, *, spacing_mm: float) -> Volume:
    """``volume`` resampled onto the isotropic grid the paper preprocessing uses (a slice stack from its true
    positions, in one interpolation), as a Volume with that grid's affine: HU float32 ``[Z1, Y1, X1]``."""
    grid = isotropic_grid(volume, spacing_mm=spacing_mm)
    hu = (resample_stack if volume.stack is not None else resample_isotropic)(volume, grid=grid)
    affine = np.asarray(volume.affine, np.float64).copy()
    affine[:3, 3] = volume.affine[:3, :3] @ grid.shift + volume.affine[:3, 3]
    affine[:3, :3] = volume.affine[:3, :3] @ np.diag(grid.scale)
    return Volume(array=hu.numpy(), affine=affine, meta=dict(volume.meta))


SLAB_SLICES = 8  # source slices per in-plane product of an in-memory volume (as the streamed path's slabs)


@dataclass(frozen=True)
class BandedWeights:
    """A resampling matrix ``W [m, n]`` kept as row blocks with the columns they touch.

    The prefiltered cubic-spline weights decay as 0.27^k away from each output's position and are cut
    below 1e-7, so each row has ~25 non-zeros: applying W block by block (``rows`` outputs against only the
    source columns they reach) computes the same sums as the dense product with a fraction of its
    multiply-adds (~5x fewer for 0.45 mm -> 1 mm), and still runs as matrix products.
    """

    m: int
    n: int
    blocks: tuple[tuple[int, int, int, int, torch.Tensor], ...]  # (row0, row1, col0, col1, W[row0:row1, col0:col1])

    @classmethod
    def of(cls, w: np.ndarray, *, rows: int = 32) -> BandedWeights:
        m, n = w.shape
        blocks = []
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            cols = np.flatnonzero(np.any(w[r0:r1] != 0, axis=0))
            c0, c1 = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
            block = torch.from_numpy(np.ascontiguousarray(w[r0:r1, c0:c1], dtype=np.float32))
            blocks.append((r0, r1, c0, c1, block))
        return cls(m=m, n=n, blocks=tuple(blocks))

    def to(self, device: torch.device | str) -> BandedWeights:
        """The same weights on ``device``."""
        blocks = tuple((r0, r1, c0, c1, b.to(device)) for r0, r1, c0, c1, b in self.blocks)
        return BandedWeights(m=self.m, n=self.n, blocks=blocks)

    def dense(self) -> torch.Tensor:
        out = torch.zeros((self.m, self.n), dtype=torch.float32)
        for r0, r1, c0, c1, block in self.blocks:
            out[r0:r1, c0:c1] = block
        return out

    def along_last(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., n] @ W.T`` -> ``[..., m]``."""
        out = torch.empty((*x.shape[:-1], self.m), dtype=torch.float32, device=x.device)
        for r0, r1, c0, c1, block in self.blocks:
            torch.matmul(x[..., c0:c1], block.T, out=out[..., r0:r1])
        return out

    def along_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``W @ x`` over the second-last axis: ``x [..., n, k]`` -> ``[..., m, k]``."""
        out = torch.empty((*x.shape[:-2], self.m, x.shape[-1]), dtype=torch.float32, device=x.device)
        for r0, r1, c0, c1, block in self.blocks:
            torch.matmul(block, x[..., c0:c1, :], out=out[..., r0:r1, :])
        return out


def memory_weights(
    *, shape_zyx: tuple[int, int, int], flips_zyx: tuple[bool, bool, bool], grid: IsotropicGrid
) -> tuple[BandedWeights, BandedWeights, BandedWeights]:
    """Spline weights ``(wz [Z1, Z], wy [Y1, Y], wx [X1, X])`` for source voxels in memory order: an axis
    stored reversed (``flips_zyx``) gets its weights' columns reversed instead of its voxels."""
    weights = []
    for axis_arr in range(3):
        axis_xyz = 2 - axis_arr
        positions = grid.source_positions(axis=axis_xyz, grid_index=np.arange(int(grid.shape[axis_xyz])))
        positions = np.ascontiguousarray(positions, dtype=np.float64)
        weights.append(_axis_weights(shape_zyx[axis_arr], positions.tobytes(), bool(flips_zyx[axis_arr])))
    return tuple(weights)


@functools.lru_cache(maxsize=32)
def _axis_weights(n: int, positions: bytes, flip: bool) -> BandedWeights:
    """One axis's banded weights, kept for the next scan of the same geometry (scans of one protocol share the
    in-plane ones): ``positions`` is the float64 array's bytes, so equal grids hit the cache exactly."""
    w = spline_weights(n=n, positions=np.frombuffer(positions, dtype=np.float64))
    return BandedWeights.of(w[:, ::-1] if flip else w)


def resample_slabs(
    slabs: Iterable[tuple[int, np.ndarray]],
    *,
    weights: tuple[BandedWeights, BandedWeights, BandedWeights],
    n_slices: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The separable resample from source slabs ``(first slice, [n, Y, X] HU)`` in memory order, which may
    arrive while the file is still being read: each slab is resampled in-plane as it comes (rows, then
    columns), the slice axis once all have. Returns float32 ``[Z1, Y1, X1]`` on ``device`` (the weights must
    be there too; default the CPU)."""
    wz, wy, wx = weights
    inplane = torch.empty((n_slices, wy.m, wx.m), dtype=torch.float32, device=device)
    filled = 0
    for first, slab in slabs:
        src = torch.from_numpy(slab).to(device) if device is not None else torch.from_numpy(slab)
        if src.dtype != torch.float32:
            src = src.float()
        part = wy.along_rows(wx.along_last(src))  # [n, Y1, X1]
        inplane[first : first + part.shape[0]] = part
        filled += part.shape[0]
    if filled != n_slices:
        raise VolumeError(f"internal: {filled} of {n_slices} slices resampled")
    return wz.along_rows(inplane.reshape(n_slices, -1)).reshape(wz.m, wy.m, wx.m)


def spline_weights(*, n: int, positions: np.ndarray, order: int = 3) -> np.ndarray:
    """``[len(positions), n]`` matrix W with ``W @ f`` = the cubic-spline interpolant of ``f [n]`` at ``positions``
    (source index units), as ``scipy.ndimage.map_coordinates(..., order=3, mode="nearest", prefilter=True)``
    computes it, which is what MONAI's ``Spacing(mode=3)`` calls (equal to ~1e-13; a test checks).

    Built in 1D: the prefiltered coefficients of every unit impulse (scipy pads a ``nearest`` input by 12 edge
    values before filtering, so this does too), combined with the four cubic B-spline taps at each position.
    """
    if order != 3:
        raise ValueError(f"only cubic splines (order 3) are implemented, got order {order}")
    coefficients = _impulse_coefficients(n)  # [n + 2 * PREFILTER_PAD, n]
    x = np.asarray(positions, np.float64)
    base = np.floor(x).astype(np.int64)
    t = x - base
    taps = ((1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6)
    w = np.zeros((len(x), n))
    for k, tap in enumerate(taps):
        rows = np.clip(base - 1 + k + PREFILTER_PAD, 0, coefficients.shape[0] - 1)  # beyond the pad: its edge
        w += tap[:, None] * coefficients[rows]
    # the prefilter's tails decay as 0.27^k: cut them below 1e-7 (|error| < 1e-3 HU) so that float32
    # never holds denormals, which slow matrix products ~30x
    w[np.abs(w) < 1e-7] = 0.0
    return w


PREFILTER_PAD = 12  # scipy.ndimage's _prepad_for_spline_filter for mode "nearest"


@functools.lru_cache(maxsize=8)
def _impulse_coefficients(n: int) -> np.ndarray:
    """Cubic-spline coefficients of each unit impulse of length ``n``, edge-padded: ``[n + 24, n]`` (read-only)."""
    padded = np.pad(np.eye(n), ((PREFILTER_PAD, PREFILTER_PAD), (0, 0)), mode="edge")
    out = spline_filter1d(padded, order=3, axis=0, mode="nearest")
    out.flags.writeable = False
    return out


def window_into(out: torch.Tensor, hu: torch.Tensor, *, window: Window) -> torch.Tensor:
    """``out[...] = clip((hu - low) / width, 0, 1)`` computed in ``out`` (same shape), as :func:`apply_windows`."""
    return out.copy_(hu).sub_(window.low).div_(window.width).clamp_(0.0, 1.0)


def apply_windows(hu: torch.Tensor, *, windows: tuple[Window, ...]) -> torch.Tensor:
    """HU ``[...]`` -> ``[len(windows), ...]``: each window's range mapped linearly onto [0, 1], clipped."""
    return torch.stack([((hu - w.low) / w.width).clamp_(0.0, 1.0) for w in windows])
