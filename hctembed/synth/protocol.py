"""Scanner protocols and the voxel grid: turn a synthetic patient into a NIfTI-ordered HU volume.

A :class:`ScanProtocol` fixes the grid (matrix, pixel spacing, slice thickness, number of slices, a small
rotation and offset of the grid in world space -- the anatomy never moves), the image quality (noise,
reconstruction-kernel sharpness) and how the array is stored (RAS, or LPS-style with the first two axes
flipped). :func:`synth_scan` samples the patient at every voxel centre, averaging several sub-slice
samples across thick slices for partial-volume realism, then blurs in-plane with the kernel, adds
correlated Gaussian noise and rounds to int16.

Arrays are in NIfTI voxel order ``[i, j, k]`` (x, y, z as nibabel stores them); affines map
``(i, j, k, 1)`` to RAS world millimetres.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .patient import SyntheticPatient, render_points

__all__ = ["ScanProtocol", "SynthConfig", "noise_free", "sample_protocol", "synth_labels", "synth_scan"]

logger = logging.getLogger(__name__)

#: Slice thicknesses (mm) real head-CT archives contain, with how common each is.
_THICKNESSES = {0.625: 0.08, 1.0: 0.14, 1.25: 0.1, 2.5: 0.16, 3.0: 0.1, 5.0: 0.42}
_MANUFACTURERS = ("SYNTHA", "SYNTHB")
#: Points rendered per chunk (bounds memory at ~100 MB whatever the matrix).
_CHUNK_POINTS = 1 << 20


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the synthetic archive (all keyword fields with defaults)."""

    matrix: int = 128  # in-plane voxels (512 = real scanner; 128 for tests/demo)
    fov_mm: float = 240.0  # in-plane field of view; pixel spacing = fov_mm / matrix, jittered a few %
    scans_per_patient: tuple[int, int] = (1, 3)  # inclusive range
    normal_fraction: float = 0.35
    slice_thickness_mm: tuple[float, float] = (0.5, 5.0)  # realistic values inside this range
    max_rotation_deg: float = 6.0
    z_extent_mm: float = 170.0  # scan coverage along z, centred on the head
    # linear size of every haemorrhage against the default (EDH/SDH extent and thickness, IPH radius and rim, SAH
    # reach; IVH fills its ventricles): 2.0 is 8x the volume of a blob. 1.0 writes the default archive bit for bit
    lesion_scale: float = 1.0


@dataclass(frozen=True)
class ScanProtocol:
    """How one scan is acquired and stored. Floats are pre-rounded so that they survive CSV round trips."""

    manufacturer: str  # "SYNTHA" (sharper, quieter) or "SYNTHB" (smoother kernel, noisier)
    matrix: int
    n_slices: int
    pixel_spacing_mm: float
    slice_thickness_mm: float  # also the slice spacing (contiguous slices)
    noise_hu: float  # standard deviation of the added noise
    rotation_deg: tuple[float, float, float]  # grid rotation about x, y, z (world axes)
    kernel_sharpness: float  # 1 = sharp bone kernel, 0 = very smooth
    storage: str  # "RAS" or "LPS" (first two array axes flipped)
    center_mm: tuple[float, float, float]  # world position of the grid centre

    @property
    def max_rotation_deg(self) -> float:
        return float(max(abs(a) for a in self.rotation_deg))

    @property
    def subsamples(self) -> int:
        """Samples averaged per voxel for partial volume: enough to cover the slice thickness (1 up to
        1.25 mm, up to 4 for 5 mm), and at least 2 for coarse pixels (> 1 mm), where thin structures such
        as the cortical tables would otherwise alias."""
        across = 1 if self.slice_thickness_mm <= 1.25 else min(4, math.ceil(self.slice_thickness_mm / 1.25))
        return max(across, 2 if self.pixel_spacing_mm > 1.0 else 1)

    def rotation(self) -> np.ndarray:
        """``[3, 3]`` rotation of the grid axes in world space (Rz @ Ry @ Rx)."""
        ax, ay, az = np.deg2rad(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def ras_affine(self) -> np.ndarray:
        """``[4, 4]`` float64 affine of the grid before any storage flip."""
        scale = np.diag([self.pixel_spacing_mm, self.pixel_spacing_mm, self.slice_thickness_mm])
        linear = self.rotation() @ scale
        middle = np.array([self.matrix - 1, self.matrix - 1, self.n_slices - 1]) / 2.0
        affine = np.eye(4)
        affine[:3, :3] = linear
        affine[:3, 3] = np.asarray(self.center_mm) - linear @ middle
        return affine

    def affine(self) -> np.ndarray:
        """``[4, 4]`` float64 affine of the stored array (``[i, j, k]`` -> RAS mm)."""
        affine = self.ras_affine()
        if self.storage == "LPS":
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = self.matrix - 1
            affine = affine @ flip
        return affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.matrix, self.matrix, self.n_slices)


def sample_protocol(*, rng: np.random.Generator, config: SynthConfig) -> ScanProtocol:
    """Draw a scan protocol for ``config``."""
    manufacturer = _MANUFACTURERS[int(rng.integers(2))]
    lo, hi = config.slice_thickness_mm
    options = [t for t in _THICKNESSES if lo <= t <= hi]
    if options:
        weights = np.array([_THICKNESSES[t] for t in options])
        thickness = float(options[int(rng.choice(len(options), p=weights / weights.sum()))])
    else:
        thickness = round(float(rng.uniform(lo, hi)), 3)
    spacing = round(config.fov_mm / config.matrix * float(rng.uniform(0.97, 1.03)), 4)
    if manufacturer == "SYNTHA":
        sharpness, noise = rng.uniform(0.65, 1.0), rng.uniform(3.0, 6.0)
    else:
        sharpness, noise = rng.uniform(0.2, 0.55), rng.uniform(4.5, 9.0)
    rot = rng.uniform(-config.max_rotation_deg, config.max_rotation_deg, size=3)
    storage = "LPS" if rng.random() < 0.3 else "RAS"
    center = rng.uniform([-4.0, -4.0, -3.0], [4.0, 4.0, 3.0])
    return ScanProtocol(
        manufacturer=manufacturer,
        matrix=config.matrix,
        n_slices=max(10, round(config.z_extent_mm / thickness)),
        pixel_spacing_mm=spacing,
        slice_thickness_mm=thickness,
        noise_hu=round(float(np.clip(noise * (2.5 / thickness) ** 0.25, 3.0, 10.0)), 2),  # thin = noisier
        rotation_deg=tuple(round(float(a), 2) for a in rot),
        kernel_sharpness=round(float(sharpness), 3),
        storage=storage,
        center_mm=tuple(round(float(c), 2) for c in center),
    )


def _sample_offsets(count: int) -> np.ndarray:
    """``[count, 3]`` sample positions inside a voxel (voxel units, centred on 0): a rank-1 lattice,
    stratified along each axis, so that a few samples integrate both across the slice and in-plane."""
    m = np.arange(count)
    along = (m + 0.5) / count - 0.5
    across = ((m * max(1, count - 1)) % count + 0.5) / count - 0.5
    return np.stack([along, across, along], axis=1).astype(np.float32) if count > 1 else np.zeros((1, 3))


def _render_grid(
    *, patient: SyntheticPatient, protocol: ScanProtocol, subsamples: int, want_labels: bool
) -> np.ndarray:
    """Render the RAS-ordered grid: mean HU ``[i, j, k]`` float32 over ``subsamples`` samples per voxel,
    or, with ``want_labels`` (and one sample), the tissue label ``[i, j, k]`` uint8 at the voxel centres."""
    n, nk = protocol.matrix, protocol.n_slices
    affine = protocol.ras_affine()
    linear, offset = affine[:3, :3].astype(np.float32), affine[:3, 3].astype(np.float32)
    ii, jj = np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32), indexing="ij")
    plane = np.stack([ii.ravel(), jj.ravel()], axis=1) @ linear[:, :2].T + offset  # [n*n, 3] at k = 0
    jitter = _sample_offsets(subsamples)  # [subsamples, 3] voxel units
    out = np.zeros((n * n, nk), dtype=np.uint8 if want_labels else np.float32)
    per_chunk = max(1, _CHUNK_POINTS // (n * n * subsamples))
    for k0 in range(0, nk, per_chunk):
        ks = np.arange(k0, min(nk, k0 + per_chunk), dtype=np.float32)
        voxel_shift = jitter[None, :, :] + np.stack([0 * ks, 0 * ks, ks], axis=1)[:, None, :]
        world_shift = voxel_shift.reshape(-1, 3) @ linear.T  # [slices * subsamples, 3]
        pts = (plane[None, :, :] + world_shift[:, None, :]).reshape(-1, 3)
        labels, hu = render_points(patient=patient, pts=pts)
        if want_labels:
            out[:, k0 : k0 + len(ks)] = labels.reshape(len(ks), n * n).T
        else:
            out[:, k0 : k0 + len(ks)] = hu.reshape(len(ks), subsamples, n * n).mean(axis=1).T
    return out.reshape(n, n, nk)


def _store(array: np.ndarray, protocol: ScanProtocol) -> np.ndarray:
    """Apply the storage flip (LPS: reverse the first two axes) to a RAS-ordered ``[i, j, k]`` array."""
    return np.ascontiguousarray(array[::-1, ::-1, :]) if protocol.storage == "LPS" else array


def synth_scan(
    *, patient: SyntheticPatient, protocol: ScanProtocol, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Image ``patient`` with ``protocol``.

    Returns ``(hu, affine)``: ``hu`` int16 ``[i, j, k]`` in NIfTI voxel order and ``affine`` ``[4, 4]``
    float64 mapping ``(i, j, k, 1)`` to RAS world mm. ``rng`` draws the noise only.
    """
    hu = _render_grid(patient=patient, protocol=protocol, subsamples=protocol.subsamples, want_labels=False)
    px = protocol.pixel_spacing_mm
    blur_mm = 0.2 + 0.55 * (1.0 - protocol.kernel_sharpness)
    hu = ndimage.gaussian_filter(hu, sigma=(blur_mm / px, blur_mm / px, 0.0), mode="nearest")
    if protocol.noise_hu > 0:
        noise = rng.standard_normal(hu.shape, dtype=np.float32)
        grain_mm = 0.3 + 0.7 * (1.0 - protocol.kernel_sharpness)
        noise = ndimage.gaussian_filter(noise, sigma=(grain_mm / px, grain_mm / px, 0.0), mode="wrap")
        noise *= np.float32(protocol.noise_hu / (noise.std() + 1e-12))
        hu += noise
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    logger.debug("synthesised %s: shape %s, %s", patient.patient_id, hu.shape, protocol)
    return _store(hu, protocol), protocol.affine()


def synth_labels(*, patient: SyntheticPatient, protocol: ScanProtocol) -> np.ndarray:
    """Tissue labels (:class:`~.anatomy.Tissue`, uint8 ``[i, j, k]``) at the voxel centres of the grid of
    :func:`synth_scan` for the same protocol, stored the same way -- ground truth for tests."""
    labels = _render_grid(patient=patient, protocol=protocol, subsamples=1, want_labels=True)
    return _store(labels, protocol)


def noise_free(protocol: ScanProtocol) -> ScanProtocol:
    """The same protocol with noise switched off (useful for comparisons)."""
    return dataclasses.replace(protocol, noise_hu=0.0)
