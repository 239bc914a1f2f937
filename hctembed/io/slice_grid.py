"""Where a DICOM stack's slices go: the uniform grid along the slice normal (regular, zoned or irregular spacing,
missing slices refused) and the orthogonal in-plane grid a gantry tilt needs (grown to every slice's field of
view), and the resampling of the slices onto them. The rules are in :mod:`hctembed.io.dicom`'s docstring."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from hctembed.io.selection import SelectionConfig
from hctembed.rescale import AIR_HU
from hctembed.volume import Volume, VolumeError

log = logging.getLogger(__name__)

__all__ = ["AIR_HU", "EDGE_SLACK_PX", "MIN_ZONE_GAPS", "Plane", "in_plane_grid", "resample", "slice_grid"]

MIN_ZONE_GAPS = 3  # a zone of regular spacing: at least this many equal gaps in a row (four slices)
EDGE_SLACK_PX = 0.01  # tilt: the grid grows for a slice reaching past it by more than this (pixels; not jitter)


@dataclass(frozen=True)
class _Zone:
    """Slices ``start`` to ``stop`` (indices, inclusive) equally ``spacing`` mm apart: gaps ``start:stop``."""

    start: int
    stop: int
    spacing: float

    @property
    def n_gaps(self) -> int:
        return self.stop - self.start


def _tolerance(step: float) -> float:
    """How far a gap may differ from ``step`` and still count as the same spacing (mm)."""
    return max(0.02 * step, 0.05)


def _zones(gaps: np.ndarray) -> list[_Zone]:
    """Maximal runs of at least MIN_ZONE_GAPS consecutive gaps equal within ``_tolerance`` of their mean."""
    zones = []
    start, total = 0, 0.0
    for i, gap in enumerate(gaps):
        if i > start and abs(gap - total / (i - start)) > _tolerance(total / (i - start)):
            if i - start >= MIN_ZONE_GAPS:
                zones.append(_Zone(start, i, total / (i - start)))
            start, total = i, 0.0
        total += float(gap)
    if len(gaps) - start >= MIN_ZONE_GAPS:
        zones.append(_Zone(start, len(gaps), total / (len(gaps) - start)))
    return zones


def _distinct_spacings(zones: list[_Zone]) -> list[float]:
    """The zones' spacings, ascending, one per group equal within tolerance (the group's finest)."""
    out: list[float] = []
    for spacing in sorted(z.spacing for z in zones):
        if not out or spacing - out[-1] > _tolerance(out[-1]):
            out.append(spacing)
    return out


def slice_grid(distance: np.ndarray, *, config: SelectionConfig, flags: list[str]) -> tuple[np.ndarray | None, float]:
    """The grid along the normal: ``(None, step)`` when the slices are regular (they are the grid), else
    ``(targets [M], step)``; an error on a missing slice or an absurd spread of spacings."""
    gaps = np.diff(distance)
    step = float(np.median(gaps))
    if step <= 0:
        raise VolumeError("slice positions do not advance along the normal")
    if np.all(np.abs(gaps - step) <= _tolerance(step)):
        return None, float((distance[-1] - distance[0]) / (len(distance) - 1))
    zones = _zones(gaps)
    if 2 * sum(z.n_gaps for z in zones) < len(gaps):  # no zone structure: spacing irregular throughout
        return _irregular_grid(distance, gaps, config=config, flags=flags)
    _refuse_missing_slices(gaps, zones, config=config)
    spacings = _distinct_spacings(zones)
    ratio = spacings[-1] / spacings[0]
    named = "+".join(f"{s:.2f}" for s in spacings)
    if ratio > config.max_spacing_ratio:
        raise VolumeError(
            f"non-uniform slice spacing: zones of {named} mm (ratio {ratio:.1f} > {config.max_spacing_ratio:g})"
        )
    finest = [z for z in zones if z.spacing - spacings[0] <= _tolerance(spacings[0])]
    anchor = max(finest, key=lambda z: z.n_gaps)  # the grid passes through the longest finest zone's slices
    targets = _targets(distance, anchor=float(distance[anchor.start]), step=anchor.spacing)
    flags.append(f"nonuniform_spacing_resampled:{named}mm")
    log.debug(
        "slice zones %s mm resampled to %.2f mm (%d -> %d slices)", named, anchor.spacing, len(distance), len(targets)
    )
    return targets, anchor.spacing


def _refuse_missing_slices(gaps: np.ndarray, zones: list[_Zone], *, config: SelectionConfig) -> None:
    """A gap outside the zones that is ``max_gap_factor`` times the coarser of its nearest zones (one each side)
    or more leaves tissue unimaged: a missing slice, not a change of zone."""
    inside = np.zeros(len(gaps), bool)
    for z in zones:
        inside[z.start : z.stop] = True
    worst: tuple[float, float, int] | None = None
    for i in np.flatnonzero(~inside):
        before = [z.spacing for z in zones if z.stop <= i][-1:]
        after = [z.spacing for z in zones if z.start > i][:1]
        usual = max(before + after)
        if gaps[i] >= config.max_gap_factor * usual and (worst is None or gaps[i] > worst[0]):
            worst = (float(gaps[i]), usual, int(i))
    if worst is not None:
        gap, usual, i = worst
        raise VolumeError(
            f"missing slices: largest gap {gap:.2f} mm where slices are {usual:.2f} mm apart "
            f"(after slice {i + 1} of {len(gaps) + 1})"
        )


def _irregular_grid(distance, gaps, *, config: SelectionConfig, flags: list[str]) -> tuple[np.ndarray, float]:
    """No zones: resample to the smallest gap, refused when the largest is over ``max_spacing_ratio`` times it."""
    ratio = float(gaps.max() / gaps.min())
    if ratio > config.max_spacing_ratio:
        raise VolumeError(
            f"non-uniform slice spacing {gaps.min():.2f}-{gaps.max():.2f} mm (ratio {ratio:.1f} > "
            f"{config.max_spacing_ratio:g})"
        )
    step = float(gaps.min())
    flags.append(f"nonuniform_spacing_resampled:{gaps.min():.2f}-{gaps.max():.2f}mm")
    return _targets(distance, anchor=float(distance[0]), step=step), step


def _targets(distance: np.ndarray, *, anchor: float, step: float) -> np.ndarray:
    """Positions ``anchor + m * step`` from the first slice to the last, never beyond either [M]."""
    first = np.ceil((distance[0] - anchor) / step - 1e-6)
    last = np.floor((distance[-1] - anchor) / step + 1e-6)
    return np.clip(anchor + np.arange(first, last + 1) * step, distance[0], distance[-1])


@dataclass(frozen=True)
class Plane:
    """The in-plane grid of a tilted stack: ``shift [K, 2]`` moves slice k's (row, column) pixel indices onto
    the output's, whose shape is ``shape`` and whose pixel (0, 0) lies at ``low`` (rows, columns) pixels from the
    first slice's; ``angle`` is the tilt in degrees."""

    shift: np.ndarray
    low: np.ndarray
    shape: tuple[int, int]
    angle: float


def in_plane_grid(positions, *, normal, row_dir, col_dir, spacing, shape) -> Plane | None:
    """Gantry tilt: slice origins drift within the slice plane. The output grid keeps the first slice's pixel
    lattice and grows to the union of every slice's field of view, so no pixel of any slice is lost."""
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)  # drift within the slice plane, mm [K, 3]
    if np.abs(in_plane).max() < 0.01:
        return None
    pixels = np.stack([in_plane @ col_dir / spacing[0], in_plane @ row_dir / spacing[1]], axis=1)  # [K, 2]
    low = np.floor(pixels.min(axis=0) + EDGE_SLACK_PX)
    high = np.ceil(pixels.max(axis=0) - EDGE_SLACK_PX)
    grown = (high - low).astype(int)
    along_normal = float((positions[-1] - positions[0]) @ normal)
    angle = float(np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), abs(along_normal))))
    log.debug("gantry tilt %.1f deg: field of view grown by %d rows, %d columns", angle, grown[0], grown[1])
    return Plane(pixels - low, low, (shape[0] + int(grown[0]), shape[1] + int(grown[1])), angle)


def stack_plane(shifts: np.ndarray, *, shape: tuple[int, int]) -> Plane | None:
    """The in-plane moves of a :class:`hctembed.volume.SliceStack`'s slices (``shifts [K, 2]``, under a voxel) as a
    :class:`Plane` of the same shape for :func:`resample`; None when no slice moves."""
    if not np.any(np.abs(shifts) > 1e-9):
        return None
    return Plane(np.asarray(shifts, np.float64), np.zeros(2), tuple(shape), 0.0)


def place_whole(hu: np.ndarray, *, shift: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Slices ``hu [K, rows, cols]`` copied (no interpolation) into grids of air of ``shape``, each moved by the
    whole voxels nearest its ``shift [K, 2]``; returns them ``[K, *shape]`` and what is left of each shift (the
    fraction of a voxel, in [-0.5, 0.5])."""
    whole = np.round(shift).astype(np.int64)
    out = np.full((hu.shape[0], *shape), AIR_HU, np.float32)
    rows, cols = hu.shape[1:]
    for k in range(hu.shape[0]):
        r0, c0 = int(whole[k, 0]), int(whole[k, 1])
        # the part of the slice inside the grid (a shift within the edge slack may reach a voxel past it)
        sr0, sc0 = max(0, -r0), max(0, -c0)
        sr1, sc1 = min(rows, shape[0] - r0), min(cols, shape[1] - c0)
        if sr1 > sr0 and sc1 > sc0:
            out[k, r0 + sr0 : r0 + sr1, c0 + sc0 : c0 + sc1] = hu[k, sr0:sr1, sc0:sc1]
    return out, shift - whole


def resample(hu, distance, *, targets, plane: Plane | None, shape: tuple[int, int]) -> np.ndarray:
    """Output ``[M, rows, cols]`` float32: at each target position along the normal, the linear blend of the two
    nearest slices, each first moved onto the output's in-plane grid (air where it has no pixel)."""
    below = np.clip(np.searchsorted(distance, targets, side="right") - 1, 0, len(distance) - 2)
    weight = (targets - distance[below]) / (distance[below + 1] - distance[below])
    out = np.empty((len(targets), *shape), np.float32)
    placed: dict[int, np.ndarray] = {}

    def slice_on_grid(k: int) -> np.ndarray:
        if k not in placed:
            for old in [j for j in placed if j < k - 1]:
                del placed[old]
            placed[k] = hu[k] if plane is None else _place(hu[k], shift=plane.shift[k], shape=shape)
        return placed[k]

    for m, (k, w) in enumerate(zip(below, weight, strict=True)):
        if w <= 1e-6:
            out[m] = slice_on_grid(k)
        elif w >= 1 - 1e-6:
            out[m] = slice_on_grid(k + 1)
        else:
            np.multiply(slice_on_grid(k), np.float32(1 - w), out=out[m])
            out[m] += np.float32(w) * slice_on_grid(k + 1)
    return out


def _place(image: np.ndarray, *, shift: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``image [rows, cols]`` moved by ``shift`` (rows, columns; bilinear) into a ``shape`` grid of air."""
    from scipy.ndimage import affine_transform

    return affine_transform(
        image, np.ones(2), offset=-shift, output_shape=shape, order=1, mode="constant", cval=AIR_HU, output=np.float32
    )


def regular(volume: Volume) -> Volume:
    """``volume`` on a regular grid: itself, or (a slice stack, :class:`hctembed.volume.SliceStack`) its slices
    blended onto the stack's regular lattice along z (``targets``) after each is moved by its in-plane fraction
    of a voxel (linear): what every consumer but the paper preprocessing reads."""
    if volume.stack is None:
        return volume
    s = volume.stack
    shape = volume.array.shape[1:]
    hu = resample(volume.array, s.positions, targets=s.targets, plane=stack_plane(s.shifts, shape=shape), shape=shape)
    affine = volume.affine.copy()
    step = float(s.targets[1] - s.targets[0]) if len(s.targets) > 1 else 1.0
    affine[:3, 3] = volume.affine[:3, 3] + volume.affine[:3, 2] * float(s.targets[0])
    affine[:3, 2] = volume.affine[:3, 2] * step
    return Volume(array=hu, affine=affine, meta=volume.meta)
