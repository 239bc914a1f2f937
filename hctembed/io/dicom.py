"""Assemble one DICOM series (classic single-frame files or one enhanced multi-frame file) into a Volume.

What dcm2niix and dicom2nifti take care over, done here too:

* slices ordered by ImagePositionPatient projected on the slice normal (never by InstanceNumber);
* per-slice RescaleSlope/Intercept to HU (missing tags: identity, flagged; skipped when the values then
  cannot be HU, i.e. there is no air below -500);
* PixelPaddingValue (and values below -1024 HU) mapped to air; MONOCHROME1 kept as HU (only display inverts);
* duplicates at one position: identical pixels are merged, different pixels are an error;
* slice spacing (gaps between positions along the normal, after merging duplicates):

  - all gaps equal (within 2%, at least 0.05 mm): the slices are the grid;
  - zones: runs of at least ``MIN_ZONE_GAPS`` equal gaps in a row (sequential head CT: 4 mm through the
    posterior fossa, 7 mm above). Gaps outside the zones are boundaries between them: an overlapping or
    interleaved slice (a gap smaller than either zone's spacing) is fine, but a gap of ``max_gap_factor``
    (1.5) times the coarser of its nearest zones or more leaves tissue unimaged: a missing slice, an error naming
    the largest such gap. So one missing slice in a regular stack is still an error, whatever the zones;
  - the zones' spacings may differ by up to ``max_spacing_ratio`` (3: coarsest / finest; 4/7 mm and 5/10 mm
    pass, 1/8 mm is refused); boundary gaps do not count, however small an overlap makes them;
  - the stack is resampled along the normal to the finest zone's spacing, on a grid through that zone's (the
    longest such) slices, so they come back unchanged: each grid slice blends the two nearest real slices
    linearly by true position, never beyond the first or last slice (the grid ends at its last step inside
    the stack). Flag ``nonuniform_spacing_resampled:4.00+7.00mm`` (the zones' spacings; the first is the step);
  - no zone structure (zones hold under half the gaps): resampled to the smallest gap when the largest is at
    most ``max_spacing_ratio`` times it, flagged ``nonuniform_spacing_resampled:2.10-5.30mm`` (smallest-largest),
    else refused;
* gantry tilt (positions stepping off the slice normal) is resampled onto an orthogonal grid that keeps the
  first slice's pixel lattice and grows to the union of every slice's field of view (as dcm2niix does), so no
  pixel of any slice is lost; where a slice has no pixel the grid holds air. Flagged
  ``gantry_tilt_corrected:18.5deg``; with zones, each grid slice blends the two nearest slices moved onto it;
* the resampled grid is checked against ``max_voxels`` before it is allocated;
* compressed transfer syntaxes decode through the installed pylibjpeg plugins; without one, a clear error
  naming the syntax.

The affine maps voxel (column, row, slice) to RAS millimetres; the volume is then reoriented to closest RAS
like a NIfTI file, so the same series gives the same Volume whichever way it was stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from hctembed.io.dicom_headers import HeaderError, read_dataset
from hctembed.io.selection import SelectionConfig
from hctembed.volume import MAX_VOXELS, Volume, VolumeError, check_affine, check_voxel_count, orient_to_ras

log = logging.getLogger(__name__)

AIR_HU = -1024.0
MIN_ZONE_GAPS = 3  # a zone of regular spacing: at least this many equal gaps in a row (four slices)
EDGE_SLACK_PX = 0.01  # tilt: the grid grows for a slice reaching past it by more than this (pixels; not jitter)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class _Slice:
    position: np.ndarray  # ImagePositionPatient [3], LPS mm
    orientation: np.ndarray  # ImageOrientationPatient [6]
    spacing: tuple[float, float]  # (between rows, between columns) mm
    raw: np.ndarray  # stored values [rows, cols]
    slope: float
    intercept: float
    padding: tuple[float, float] | None  # (PixelPaddingValue, PixelPaddingRangeLimit or same)
    rescale_missing: bool


def load_dicom_series(
    root: Path, files: Sequence[str], *, config: SelectionConfig | None = None, max_voxels: int = MAX_VOXELS
) -> Volume:
    """Read and assemble the files of one series (paths relative to ``root``; zip members allowed).

    Each file's Rows x Columns x NumberOfFrames is added up and checked against ``max_voxels`` before its
    pixels are decoded, so a header that claims a huge image fails the series without allocating it."""
    config = config or SelectionConfig()
    slices: list[_Slice] = []
    flags: list[str] = []
    claimed = 0
    for ref in files:
        try:
            ds = read_dataset(root, ref, pixels=True)
        except HeaderError as exc:
            raise VolumeError(f"unreadable slice file: {exc}") from None
        try:
            frame = (int(ds.get("NumberOfFrames", 1) or 1), int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        except (TypeError, ValueError):
            raise VolumeError("a slice has a malformed Rows, Columns or NumberOfFrames") from None
        claimed += check_voxel_count(frame, max_voxels=max_voxels, what="a slice header")
        if claimed > max_voxels:
            raise VolumeError(f"the series' headers claim over {max_voxels:,} voxels in all (--max-voxels)")
        slices.extend(_slices_of(ds))
    if not slices:
        raise VolumeError("no image slices")
    if any(s.rescale_missing for s in slices):
        flags.append("rescale_missing")
    return assemble(slices, flags=flags, config=config, max_voxels=max_voxels)


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if hasattr(ds, "file_meta") else None
    try:
        return np.asarray(ds.pixel_array)
    except (NotImplementedError, RuntimeError) as exc:
        name = syntax.name if syntax else "unknown"
        if "decod" in str(exc).lower() or "plugin" in str(exc).lower() or "handler" in str(exc).lower():
            raise VolumeError(
                f"cannot decode transfer syntax {name} ({syntax}): no pixel-data plugin installed for it"
            ) from None
        raise VolumeError(f"pixel data unreadable ({type(exc).__name__})") from None
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, OSError) as exc:
        raise VolumeError(f"pixel data unreadable or truncated ({type(exc).__name__})") from None


def _padding(ds: pydicom.Dataset) -> tuple[float, float] | None:
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit", value)
    return float(min(value, limit)), float(max(value, limit))


def _rescale(item) -> tuple[float, float, bool]:
    slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
    if slope is None and intercept is None:
        return 1.0, 0.0, True
    return float(slope if slope is not None else 1.0), float(intercept if intercept is not None else 0.0), False


def _slices_of(ds: pydicom.Dataset) -> list[_Slice]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = _decode(ds)
    padding = _padding(ds)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        if pixels.ndim != 2:
            raise VolumeError(f"unexpected pixel array shape {pixels.shape} (colour or multi-sample data?)")
        try:
            position = np.array([float(v) for v in ds.ImagePositionPatient])
            orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
            spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        except (AttributeError, TypeError, ValueError, IndexError):
            raise VolumeError("a slice lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing") from None
        slope, intercept, missing = _rescale(ds)
        return [_Slice(position, orientation, spacing, pixels, slope, intercept, padding, missing)]
    return _frames_of(ds, pixels.reshape(frames, *pixels.shape[-2:]), padding)


def _frames_of(ds: pydicom.Dataset, pixels: np.ndarray, padding) -> list[_Slice]:
    """Enhanced multi-frame: geometry and rescale per frame, falling back on the shared groups."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else pydicom.Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != pixels.shape[0]:
        raise VolumeError(f"{pixels.shape[0]} frames but {len(per_frame)} per-frame functional groups")

    def find(group, sequence, default=None):
        for source in (group, shared):
            if sequence in source and len(source[sequence].value):
                return source[sequence].value[0]
        return default

    out = []
    for i, group in enumerate(per_frame):
        plane = find(group, "PlanePositionSequence")
        orient = find(group, "PlaneOrientationSequence")
        measures = find(group, "PixelMeasuresSequence")
        if plane is None or orient is None or measures is None:
            raise VolumeError(f"frame {i + 1} lacks plane position, orientation or pixel measures")
        transform = find(group, "PixelValueTransformationSequence", pydicom.Dataset())
        slope, intercept, missing = _rescale(transform)
        out.append(
            _Slice(
                np.array([float(v) for v in plane.ImagePositionPatient]),
                np.array([float(v) for v in orient.ImageOrientationPatient]),
                (float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
                pixels[i],
                slope,
                intercept,
                padding,
                missing,
            )
        )
    return out


def assemble(
    slices: list[_Slice], *, flags: list[str], config: SelectionConfig, max_voxels: int = MAX_VOXELS
) -> Volume:
    """Order, check and stack slices into a RAS Volume (see the module docstring for the rules)."""
    first = slices[0]
    for s in slices[1:]:
        if s.raw.shape != first.raw.shape or not np.allclose(s.orientation, first.orientation, atol=1e-3):
            raise VolumeError("slices differ in matrix size or orientation")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise VolumeError("ImageOrientationPatient is not two orthogonal unit vectors")
    distance = np.array([float(np.dot(normal, s.position)) for s in slices])
    order = np.argsort(distance, kind="stable")
    slices = [slices[i] for i in order]
    distance = distance[order]
    slices, distance = _merge_duplicates(slices, distance, flags=flags)
    if len(slices) < 2:
        raise VolumeError(f"{len(slices)} distinct slice position(s): not a volume")
    hu = np.empty((len(slices), *first.raw.shape), np.float32)  # [k, rows, cols], filled slice by slice
    for k, s in enumerate(slices):
        _to_hu(s, out=hu[k])
    if "rescale_missing" in flags and np.percentile(hu, 1) > -500:
        raise VolumeError("no RescaleSlope/Intercept and no air below -500: stored values are not HU")
    targets, step = _slice_grid(distance, config=config, flags=flags)
    positions = np.array([s.position for s in slices])
    plane = _in_plane_grid(
        positions, normal=normal, row_dir=row_dir, col_dir=col_dir, spacing=first.spacing, shape=first.raw.shape
    )
    if targets is not None or plane is not None:
        targets = distance if targets is None else targets
        shape = plane.shape if plane is not None else first.raw.shape
        check_voxel_count((len(targets), *shape), max_voxels=max_voxels, what="the resampled grid")
        hu = _resample(hu, distance, targets=targets, plane=plane, shape=shape)
    if plane is not None:
        flags.append(f"gantry_tilt_corrected:{plane.angle:.1f}deg")
    low = plane.low if plane is not None else np.zeros(2)
    first_target = distance[0] if targets is None else targets[0]
    # grid origin: the first slice's, moved to the enlarged field of view's corner and to the first target
    origin = (
        slices[0].position
        + low[1] * first.spacing[1] * row_dir
        + low[0] * first.spacing[0] * col_dir
        + (first_target - distance[0]) * normal
    )
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * first.spacing[1]  # along a row: columns, spacing between columns
    affine_lps[:3, 1] = col_dir * first.spacing[0]  # down a column: rows, spacing between rows
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = origin
    affine = LPS_TO_RAS @ affine_lps
    check_affine(affine)
    array_xyz, affine_ras, codes = orient_to_ras(hu.transpose(2, 1, 0), affine)
    meta = {
        "format": "dicom",
        "source_axcodes": "".join(codes),
        "flags": flags,
        "n_slices": int(hu.shape[0]),
    }
    return Volume(array=array_xyz.transpose(2, 1, 0), affine=affine_ras, meta=meta)


def _to_hu(s: _Slice, *, out: np.ndarray) -> np.ndarray:
    """Stored values -> HU in ``out [rows, cols]`` (float32): rescale, padding and out-of-field to air."""
    np.multiply(s.raw, np.float32(s.slope), out=out, casting="unsafe")
    out += np.float32(s.intercept)
    if s.padding is not None:
        lo, hi = s.padding
        out[(s.raw >= lo) & (s.raw <= hi)] = AIR_HU
    np.maximum(out, AIR_HU, out=out)  # out-of-field values (-2048, -3024) are air
    return out


def _merge_duplicates(slices, distance, *, flags):
    keep = [0]
    merged = 0
    for i in range(1, len(slices)):
        if abs(distance[i] - distance[keep[-1]]) < 1e-3:
            if np.array_equal(slices[i].raw, slices[keep[-1]].raw):
                merged += 1
                continue
            raise VolumeError(f"two different slices at one position ({distance[i]:.1f} mm along the normal)")
        keep.append(i)
    if merged:
        flags.append(f"duplicate_positions_merged:{merged}")
    return [slices[i] for i in keep], distance[keep]


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


def _slice_grid(distance: np.ndarray, *, config: SelectionConfig, flags: list[str]) -> tuple[np.ndarray | None, float]:
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
class _Plane:
    """The in-plane grid of a tilted stack: ``shift [K, 2]`` moves slice k's (row, column) pixel indices onto
    the output's, whose shape is ``shape`` and whose pixel (0, 0) lies at ``low`` (rows, columns) pixels from the
    first slice's; ``angle`` is the tilt in degrees."""

    shift: np.ndarray
    low: np.ndarray
    shape: tuple[int, int]
    angle: float


def _in_plane_grid(positions, *, normal, row_dir, col_dir, spacing, shape) -> _Plane | None:
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
    return _Plane(pixels - low, low, (shape[0] + int(grown[0]), shape[1] + int(grown[1])), angle)


def _resample(hu, distance, *, targets, plane: _Plane | None, shape: tuple[int, int]) -> np.ndarray:
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
