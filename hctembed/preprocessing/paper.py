"""The paper preset (FM-HCT Methods, 'Data preprocessing'), twice: a fast path and the plain MONAI chain.

* :func:`preprocess_paper_reference` - the MONAI transform chain, slow and obviously right:
  ``Orientation(RAS) -> Spacing(1 mm, spline order 3) -> CropForeground(HU > -500) -> HU windows
  -> ResizeWithPadOrCrop(224) -> CenterSpatialCrop(192) -> Resize(96, area)``.
* :func:`preprocess_paper` - the fast path used everywhere else. It composes the geometry of the whole chain
  (orientation, spacing, foreground crop, pad, centre crop) into one separable cubic-spline resample
  (:mod:`hctembed.preprocessing.resample`), applies the windows on just the voxels that are kept, and
  area-averages down to the model grid. :func:`preprocess_stream` does the same while a ``.nii.gz`` is
  still being inflated.

Both return float32 ``[C, Z, Y, X]`` (C = number of windows; Z, Y, X along S, A, R), values in [0, 1].
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hctembed.config import PreprocessConfig
from hctembed.io.slice_grid import regular
from hctembed.preprocessing.resample import (
    IsotropicGrid,
    apply_windows,
    foreground_bounds,
    grid_for,
    isotropic_grid,
    memory_weights,
    resample_isotropic,
    resample_slabs,
    resample_stack,
    window_into,
)
from hctembed.volume import Volume


def crop_start(*, lo: np.ndarray, hi: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Index (x, y, z) on the isotropic grid of the first voxel of the ``crop_size``³ region, given the
    inclusive bounds ``lo, hi`` of what is kept (the head, or the whole grid).

    Mirrors ResizeWithPadOrCrop (symmetric pad ``(pad - size) // 2`` before, or a centre crop starting at
    ``size // 2 - pad // 2``) followed by CenterSpatialCrop. The start can be negative or run past the
    grid: those voxels are padding (0 after windowing).
    """
    size = hi - lo + 1
    pad = config.pad_size
    offset = np.where(size <= pad, -((pad - size) // 2), size // 2 - pad // 2)
    return lo + offset + (pad // 2 - config.crop_size // 2)


def preprocess_paper(
    volume: Volume, *, config: PreprocessConfig, device: torch.device | str | None = None
) -> torch.Tensor:
    """Fast paper preprocessing: a separable resample, then windows on just the voxels that are kept.

    The 3D cubic-spline resample is three matrix products straight from the file's buffer, the same
    interpolant as the reference's ``Spacing(mode=3)`` (to float rounding) at a fraction of the cost. The
    head's bounding box, the pad/crop and the windows then act on that grid; an area average brings it to
    ``out_size``.

    Args:
        volume: HU volume, array ``[Z, Y, X]`` (any strides; copied only if its axes are permuted in memory).
        device: where everything after the voxels are read runs (``"cuda"``: a GPU node's CPUs only decode);
            default the CPU. The same operations either way (mean |difference| ~1e-7 between CPU and GPU).
    Returns:
        float32 tensor ``[C, out, out, out]`` in ``[0, 1]``, axes ``[C, Z(S), Y(A), X(R)]``, on ``device``.
    """
    grid = isotropic_grid(volume, spacing_mm=config.spacing_mm)
    if volume.stack is not None:  # slice zones or gantry tilt: one interpolation from the true positions
        return finish(resample_stack(volume, grid=grid, device=device), grid=grid, config=config)
    return finish(resample_isotropic(volume, grid=grid, device=device), grid=grid, config=config)


def preprocess_stream(
    stream, *, config: PreprocessConfig, look: Callable[[torch.Tensor], None] | None = None
) -> torch.Tensor:
    """:func:`preprocess_paper` of a file read slab by slab (:class:`hctembed.io.nifti_stream.NiftiStream`: its
    RAS ``affine``, ``shape_xyz``, ``flips_zyx`` and ``slabs()``): each slab is resampled in-plane while the
    next is inflated, so decoding and resampling overlap. Same result as ``preprocess(load_nifti(path))``.
    ``look(hu)`` sees the isotropic HU grid ``[Z, Y, X]`` (``config.spacing_mm``) before it is cropped (the
    head check); it may raise to stop there."""
    slabs = stream.slabs()
    first = next(slabs)  # inflating has started in the background: compute the weights meanwhile
    grid = grid_for(affine=stream.affine, shape_xyz=stream.shape_xyz, spacing_mm=config.spacing_mm)
    nx, ny, nz = stream.shape_xyz
    weights = memory_weights(shape_zyx=(nz, ny, nx), flips_zyx=stream.flips_zyx, grid=grid)
    hu = resample_slabs(itertools.chain([first], slabs), weights=weights, n_slices=nz)
    if look is not None:
        look(hu)
    return finish(hu, grid=grid, config=config)


def finish(hu: torch.Tensor, *, grid: IsotropicGrid, config: PreprocessConfig) -> torch.Tensor:
    """The isotropic HU grid ``[Z1, Y1, X1]`` -> model input ``[C, out, out, out]``: head box, pad/crop,
    windows, area average (the part of :func:`preprocess_paper` after the resample)."""
    if config.centre_on_head:
        lo, hi = foreground_bounds(hu, threshold=config.foreground_hu)
    else:
        lo, hi = np.zeros(3, np.int64), grid.shape - 1
    start = crop_start(lo=lo, hi=hi, config=config)
    c = config.crop_size
    # the part of the crop inside the kept box (the head, as CropForeground leaves it); the rest is padding (0)
    src_lo = np.maximum(start, lo)
    src_hi = np.minimum(start + c, hi + 1)
    dst_lo = src_lo - start
    factor = c // config.out_size
    if factor <= 1:
        windowed = torch.zeros((config.channels, c, c, c), dtype=torch.float32, device=hu.device)
        _window_region(windowed, hu, src_lo=src_lo, src_hi=src_hi, dst_lo=dst_lo, config=config)
        return windowed
    # windows and area average a slab of crop planes at a time: the full-size windowed crop (85 MB at 192³ x 3)
    # is never allocated, and each slab is averaged while it is still in cache. Slabs start at multiples of
    # the pooling factor, so every output voxel averages the same inputs in the same order as one whole pass.
    out = config.out_size
    pooled = torch.empty((config.channels, out, out, out), dtype=torch.float32, device=hu.device)
    step = factor * SLAB_OUTPUT_PLANES
    slab = torch.empty((config.channels, step, c, c), dtype=torch.float32, device=hu.device)
    for z_dst in range(0, out * factor, step):
        n = min(step, out * factor - z_dst)
        part = slab[:, :n]
        part.zero_()
        # this slab's planes of the destination region, as a crop of the source and destination boxes
        lo_z = max(int(dst_lo[2]), z_dst)
        hi_z = min(int(dst_lo[2] + src_hi[2] - src_lo[2]), z_dst + n)
        if hi_z > lo_z:
            s_lo = src_lo.copy()
            s_hi = src_hi.copy()
            s_lo[2] = src_lo[2] + (lo_z - dst_lo[2])
            s_hi[2] = src_lo[2] + (hi_z - dst_lo[2])
            d_lo = dst_lo.copy()
            d_lo[2] = lo_z - z_dst
            _window_region(part, hu, src_lo=s_lo, src_hi=s_hi, dst_lo=d_lo, config=config)
        pooled[:, z_dst // factor : (z_dst + n) // factor] = F.avg_pool3d(part[None], kernel_size=factor)[0]
    return pooled


SLAB_OUTPUT_PLANES = 4  # output planes per windowing slab (4 x 2 crop planes x 192² x 3 windows: 3.5 MB)


def _window_region(
    dst: torch.Tensor, hu: torch.Tensor, *, src_lo: np.ndarray, src_hi: np.ndarray, dst_lo: np.ndarray,
    config: PreprocessConfig,
) -> None:  # fmt: skip
    """Each window of ``hu``'s box ``[src_lo, src_hi)`` (x, y, z) into ``dst [C, Z, Y, X]`` at ``dst_lo``, in place
    (no full-size temporaries). An empty box writes nothing."""
    if not np.all(src_hi > src_lo):
        return
    (x0, y0, z0), (x1, y1, z1), (a, b, d) = src_lo, src_hi, dst_lo
    region = hu[z0:z1, y0:y1, x0:x1]
    for channel, w in zip(dst, config.windows, strict=True):
        window_into(channel[d : d + z1 - z0, b : b + y1 - y0, a : a + x1 - x0], region, window=w)


def reference_chain(config: PreprocessConfig):
    """The paper's preprocessing as a MONAI ``Compose`` over a channel-first MetaTensor ``[1, X, Y, Z]``."""
    from monai.transforms import (
        CenterSpatialCrop,
        Compose,
        CropForeground,
        Lambda,
        Orientation,
        Resize,
        ResizeWithPadOrCrop,
        Spacing,
    )

    threshold = config.foreground_hu
    steps = [
        Orientation(axcodes="RAS"),
        # mode=3: cubic spline (MONAI has no 3D bicubic; the paper's code uses spline order 3)
        Spacing(pixdim=config.spacing_mm, mode=3, padding_mode="nearest"),
    ]
    if config.centre_on_head:
        steps.append(CropForeground(select_fn=lambda x: x > threshold, margin=0, allow_smaller=True))
    steps += [
        Lambda(lambda img: apply_windows(img[0], windows=config.windows)),
        ResizeWithPadOrCrop(spatial_size=(config.pad_size,) * 3, mode="constant"),
        CenterSpatialCrop(roi_size=(config.crop_size,) * 3),
        Resize(spatial_size=(config.out_size,) * 3, mode="area"),
    ]
    return Compose(steps)


def preprocess_paper_reference(volume: Volume, *, config: PreprocessConfig) -> torch.Tensor:
    """The MONAI chain on a Volume; float32 ``[C, out, out, out]`` as ``[C, Z, Y, X]`` like the fast path."""
    from monai.data import MetaTensor

    volume = regular(volume)  # MONAI reads a regular grid (a stack's slices blended onto one first)
    xyz = np.ascontiguousarray(volume.array.transpose(2, 1, 0), dtype=np.float32)
    img = MetaTensor(torch.from_numpy(xyz)[None], affine=torch.from_numpy(volume.affine))
    out = reference_chain(config)(img)
    out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
    out = out.float()  # [C, X, Y, Z]
    return out.permute(0, 3, 2, 1).contiguous()
