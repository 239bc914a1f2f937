"""Training views for self-supervised pretraining (FM-HCT Methods, 'Self-supervised pretraining').

Every view is cut from a *base volume*: the paper preprocessing stopped at the 224 mm pad/crop around the
head (no 192 centre crop), i.e. ``[C, S, S, S]`` windows in ``[0, 1]`` at ``224 / S`` mm per voxel
(S = 224 for the paper's 96³ model; S = 112 for a 48³ model). Crop sizes are given in millimetres, as in
the paper, and converted to base voxels.

* DINO multi-crop: 2 global crops of 112-224 mm and ``n_local`` local crops of 64-112 mm (cubes at a random
  place), each resized to the model input, then random flips along each axis, an intensity shift and a
  contrast change, and a Gaussian blur.
* MAE: one random cubic crop (144-224 mm) resized to the model input, and a random left-right flip.
* SimCLR (contrastive pairs): two views of the *whole* head at the embedding-time field of view, each with its own
  random rotation, anisotropic scaling and shift, a left-right flip, Gaussian noise and blur. Both views hold the
  same tissue, so what they share is what survives deformation (how much of the head is blood-dense, fluid, bone),
  not where the head's outline lies; no intensity jitter (CT numbers are calibrated). Optionally each view is its
  own random cube of the base first (akin to SimCLR's random resized crop, ``crop_mm``).

All randomness comes from the ``torch.Generator`` passed in, so a run reproduces exactly from its seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hctembed.config import PreprocessConfig
from hctembed.errors import InputError

BASE_MM = 224  # the paper resamples/pads to 224³ at 1 mm before cropping


def base_preprocess(*, image_size: int) -> PreprocessConfig:
    """The paper preset stopped at the 224 mm pad/crop around the head: ``S = image_size * 224 / 96`` voxels
    of ``224 / S`` mm. For the 96³ model that is the paper's 224³ at 1 mm; for a 48³ model, 112³ at 2 mm
    (resampled straight to 2 mm, which is 8x less work than 1 mm and an average)."""
    size = round(image_size * BASE_MM / 96)
    if size < 1:
        raise InputError(f"image_size {image_size} is too small")
    return PreprocessConfig(
        name="pretrain-base", spacing_mm=BASE_MM / size, pad_size=size, crop_size=size, out_size=size
    )


@dataclass(frozen=True)
class MultiCropConfig:
    """DINO views. Sizes in mm of the 224 mm base; ``out_size`` is the model input edge in voxels."""

    out_size: int = 96
    n_global: int = 2
    n_local: int = 3
    global_mm: tuple[float, float] = (112.0, 224.0)
    local_mm: tuple[float, float] = (64.0, 112.0)
    flip_p: float = 0.5
    shift: float = 0.1  # intensity shift drawn from U(-shift, shift) (window units, [0, 1] range)
    contrast: tuple[float, float] = (0.75, 1.25)  # contrast factor around the crop's mean
    blur_p: tuple[float, ...] = (1.0, 0.1)  # per global view; local views use blur_p_local
    blur_p_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.5)  # in output voxels

    def __post_init__(self) -> None:
        for lo, hi in (self.global_mm, self.local_mm):
            if not 0 < lo <= hi <= BASE_MM:
                raise InputError(f"crop range ({lo}, {hi}) mm must lie in (0, {BASE_MM}]")
        if self.n_global < 1:
            raise InputError("at least one global crop is needed")


@dataclass(frozen=True)
class MaeCropConfig:
    out_size: int = 96
    crop_mm: tuple[float, float] = (144.0, 224.0)
    flip_p: float = 0.5  # left-right (X) only


def _randint(lo: int, hi: int, g: torch.Generator) -> int:
    """Uniform integer in ``[lo, hi]``."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _uniform(lo: float, hi: float, g: torch.Generator) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def crop_size_voxels(mm: tuple[float, float], *, base: int) -> tuple[int, int]:
    """A millimetre range on the 224 mm base -> an integer voxel range on a ``base``-voxel volume."""
    scale = base / BASE_MM
    lo, hi = max(1, round(mm[0] * scale)), max(1, round(mm[1] * scale))
    return min(lo, base), min(hi, base)


def random_crop(x: torch.Tensor, *, size_range: tuple[int, int], g: torch.Generator) -> tuple[torch.Tensor, int]:
    """A random cube of edge ``size_range[0]..size_range[1]`` from ``x [C, S, S, S]``; returns (crop, edge)."""
    s = _randint(size_range[0], size_range[1], g)
    starts = [_randint(0, n - s, g) for n in x.shape[1:]]
    z, y, w = starts
    return x[:, z : z + s, y : y + s, w : w + s], s


def resize(x: torch.Tensor, *, size: int) -> torch.Tensor:
    """``[C, s, s, s]`` -> ``[C, size, size, size]``: area averaging when shrinking, trilinear when growing."""
    if x.shape[1] == size:
        return x.clone()
    if x.shape[1] > size:
        return F.interpolate(x[None], size=(size,) * 3, mode="area")[0]
    return F.interpolate(x[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0]


def gaussian_blur(x: torch.Tensor, *, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x [C, Z, Y, X]`` (kernel radius 3 sigma, replicate padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[0]
    out = x[None]
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k.numel()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        out = F.conv3d(F.pad(out, pad, mode="replicate"), k.view(shape).expand(c, 1, *shape[2:]), groups=c)
    return out[0]


def photometric(x: torch.Tensor, *, config: MultiCropConfig, blur_p: float, g: torch.Generator) -> torch.Tensor:
    """Random flips (each axis), intensity shift, contrast and (with probability ``blur_p``) blur."""
    for axis in (1, 2, 3):
        if float(torch.rand((), generator=g)) < config.flip_p:
            x = x.flip(axis)
    shift = _uniform(-config.shift, config.shift, g)
    factor = _uniform(*config.contrast, g)
    mean = x.mean()
    x = ((x - mean) * factor + mean + shift).clamp_(0.0, 1.0)
    if float(torch.rand((), generator=g)) < blur_p:
        x = gaussian_blur(x, sigma=_uniform(*config.blur_sigma, g))
    return x.contiguous()


def multi_crop(base: torch.Tensor, *, config: MultiCropConfig, g: torch.Generator) -> list[torch.Tensor]:
    """``base [C, S, S, S]`` -> ``n_global + n_local`` views, each ``[C, out, out, out]`` (globals first)."""
    s = base.shape[1]
    views = []
    for i in range(config.n_global):
        crop, _ = random_crop(base, size_range=crop_size_voxels(config.global_mm, base=s), g=g)
        p = config.blur_p[i] if i < len(config.blur_p) else config.blur_p[-1]
        views.append(photometric(resize(crop, size=config.out_size), config=config, blur_p=p, g=g))
    for _ in range(config.n_local):
        crop, _ = random_crop(base, size_range=crop_size_voxels(config.local_mm, base=s), g=g)
        views.append(photometric(resize(crop, size=config.out_size), config=config, blur_p=config.blur_p_local, g=g))
    return views


def mae_crop(base: torch.Tensor, *, config: MaeCropConfig, g: torch.Generator) -> torch.Tensor:
    """``base [C, S, S, S]`` -> one view ``[C, out, out, out]``: random cubic crop and left-right flip."""
    crop, _ = random_crop(base, size_range=crop_size_voxels(config.crop_mm, base=base.shape[1]), g=g)
    view = resize(crop, size=config.out_size)
    if float(torch.rand((), generator=g)) < config.flip_p:
        view = view.flip(3)
    return view.contiguous()


@dataclass(frozen=True)
class PairViewConfig:
    """SimCLR views: two independently deformed copies of the model input (the centre 192 mm of the base), or with
    ``crop_mm`` of two random cubes of the base, each resized to the model input."""

    out_size: int = 96
    rotate_deg: float = 15.0  # about each axis, U(-r, r)
    scale: tuple[float, float] = (0.85, 1.15)  # per axis
    shift: float = 0.08  # per axis, a fraction of the field of view
    flip_p: float = 0.5  # left-right (X)
    noise_std: tuple[float, float] = (0.0, 0.03)  # window units
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # in output voxels
    # each view's own intensity shift U(-shift, shift) (window units) and contrast factor about its mean: SimCLR's
    # colour jitter. Off by default (CT numbers are calibrated; the views of BENCHMARKS.md's SimCLR runs); on, two
    # views of one scan no longer share its exact CT numbers, which otherwise match them without any anatomy
    intensity_shift: float = 0.0
    contrast: tuple[float, float] = (1.0, 1.0)
    # each view its own random cube of this edge range (mm of the 224 mm base, anywhere in it), resized to the model
    # input before the deformation, akin to SimCLR's random resized crop: two views then share what the volume holds
    # throughout rather than where it lies. None (the default): both views deform the whole embedding-time input
    crop_mm: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise InputError(f"scale range {self.scale} must be positive and ordered")
        if self.crop_mm is not None and not 0 < self.crop_mm[0] <= self.crop_mm[1] <= BASE_MM:
            raise InputError(f"crop range {self.crop_mm} mm must be ordered and lie in (0, {BASE_MM}]")
        if self.intensity_shift < 0 or not 0 < self.contrast[0] <= self.contrast[1]:
            raise InputError(f"intensity shift {self.intensity_shift} must be >= 0 and contrast {self.contrast} "
                             "positive and ordered")  # fmt: skip

    @property
    def jitters_intensity(self) -> bool:
        return self.intensity_shift > 0 or self.contrast != (1.0, 1.0)


def _rotation(angles: tuple[float, float, float]) -> torch.Tensor:
    """The 3x3 rotation about the three axes in turn by ``angles`` (radians), float64."""
    out = torch.eye(3, dtype=torch.float64)
    for axis, a in enumerate(angles):
        i, j = [k for k in range(3) if k != axis]
        r = torch.eye(3, dtype=torch.float64)
        r[i, i] = r[j, j] = math.cos(a)
        r[i, j], r[j, i] = -math.sin(a), math.sin(a)
        out = r @ out
    return out


def affine_resample(
    x: torch.Tensor, *, angles: tuple[float, float, float], scales: tuple[float, float, float],
    shifts: tuple[float, float, float],
) -> torch.Tensor:  # fmt: skip
    """``x [C, S, S, S]`` resampled (trilinear, air outside): output point ``p`` takes the input at
    ``R(angles) · p / scales - 2 · shifts`` in ``affine_grid``'s [-1, 1] coordinates, (x, y, z) = (X, Y, Z) order, with
    ``R`` the turns about each axis in turn (radians). The head thus moves by ``shifts`` (fractions of the field of
    view), then turns by ``-angles`` and grows by ``scales`` about the centre; all zeros and ones give ``x`` back."""
    s = torch.tensor(scales, dtype=torch.float64)
    t = torch.tensor(shifts, dtype=torch.float64) * 2  # affine_grid's coordinates span [-1, 1]
    # affine_grid maps output to input coordinates: the inverse of turning, then growing, then moving
    theta = torch.cat([_rotation(angles) @ torch.diag(1.0 / s), -t[:, None]], dim=1)
    grid = F.affine_grid(theta[None].to(x.dtype), [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


def random_affine(x: torch.Tensor, *, config: PairViewConfig, g: torch.Generator) -> torch.Tensor:
    """:func:`affine_resample` with a rotation, scaling and shift drawn from ``config``'s ranges."""
    r = math.radians(config.rotate_deg)
    angles = tuple(_uniform(-r, r, g) for _ in range(3))
    scales = tuple(_uniform(*config.scale, g) for _ in range(3))
    # drawn negated: this keeps the views bit for bit those of BENCHMARKS.md's SimCLR run (checked when the resampler
    # was split out of this function, whose first form added the shift to the grid)
    shifts = tuple(-_uniform(-config.shift, config.shift, g) for _ in range(3))
    return affine_resample(x, angles=angles, scales=scales, shifts=shifts)


def pair_views(base: torch.Tensor, *, config: PairViewConfig, g: torch.Generator) -> list[torch.Tensor]:
    """``base [C, S, S, S]`` -> two views ``[C, out, out, out]`` of the whole head (see the module docstring), or with
    ``config.crop_mm`` of two random cubes of it."""
    whole = input_from_base(base, image_size=config.out_size) if config.crop_mm is None else None
    views = []
    for _ in range(2):
        if whole is None:
            crop, _ = random_crop(base, size_range=crop_size_voxels(config.crop_mm, base=base.shape[1]), g=g)
            x = resize(crop, size=config.out_size)
        else:
            x = whole
        v = random_affine(x, config=config, g=g)
        if float(torch.rand((), generator=g)) < config.flip_p:
            v = v.flip(3)
        if config.jitters_intensity:  # no draws when off: the views stay those of earlier runs, bit for bit
            shift = _uniform(-config.intensity_shift, config.intensity_shift, g)
            factor = _uniform(*config.contrast, g)
            mean = v.mean()
            v = (v - mean) * factor + mean + shift
        std = _uniform(*config.noise_std, g)
        if std > 0:
            v = v + std * torch.randn(v.shape, generator=g, dtype=v.dtype)
        if float(torch.rand((), generator=g)) < config.blur_p:
            v = gaussian_blur(v, sigma=_uniform(*config.blur_sigma, g))
        views.append(v.clamp_(0.0, 1.0).contiguous())
    return views


def sample_generator(*, seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for one sample's views: a function of (seed, epoch, sample index) only, so the views
    do not depend on worker processes, ranks or where a run was resumed."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2**63 - 1))
    return g


CROP_MM = 192.0  # the paper's centre crop of the 224 mm base


def input_from_base(
    base: torch.Tensor, *, image_size: int, g: torch.Generator | None = None, jitter: float = 0.25,
    flip_p: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """``base [C, S, S, S]`` (224 mm) -> model input ``[C, image_size]³``: the centre 192 mm resized, as at embedding
    time (``g`` None); with ``g``, the crop shifted by up to ``jitter`` of its margin per axis and flipped left-right
    with probability ``flip_p`` (fine-tuning augmentation)."""
    s = base.shape[1]
    crop = round(s * CROP_MM / BASE_MM)
    centre = (s - crop) // 2
    starts = [centre] * 3
    if g is not None:
        reach = int((s - crop) // 2 * jitter)
        starts = [centre + int(torch.randint(-reach, reach + 1, (), generator=g)) for _ in range(3)]
    z, y, x = starts
    out = resize(base[:, z : z + crop, y : y + crop, x : x + crop], size=image_size)
    if g is not None and float(torch.rand((), generator=g)) < flip_p:
        out = out.flip(3)  # X is the patient's left-right axis in RAS order
    return out.contiguous()
