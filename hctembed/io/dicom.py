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
    posterior fossa, 7 mm above; :mod:`hctembed.io.slice_grid` computes the grids). Gaps outside the zones
    are boundaries between them: an overlapping or interleaved slice (a gap smaller than either zone's
    spacing) is fine, but a gap of ``max_gap_factor``
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from hctembed.io.admission import Limits, ZipFiles, split_ref
from hctembed.io.dicom_headers import HeaderError, read_dataset
from hctembed.io.dicom_native import StoredPixels, read_native
from hctembed.io.selection import SelectionConfig
from hctembed.io.slice_grid import in_plane_grid, place_whole, regular, slice_grid
from hctembed.rescale import Rescale, StoredValues
from hctembed.volume import (
    MAX_VOXELS,
    SliceStack,
    Volume,
    VolumeError,
    check_affine,
    check_voxel_count,
    ras_orientation,
    reorient,
)

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class _Slice:
    position: np.ndarray  # ImagePositionPatient [3], LPS mm
    orientation: np.ndarray  # ImageOrientationPatient [6]
    spacing: tuple[float, float]  # (between rows, between columns) mm
    raw: np.ndarray | StoredPixels  # stored values [rows, cols], or where an uncompressed file holds them
    slope: float
    intercept: float
    padding: tuple[float, float] | None  # (PixelPaddingValue, PixelPaddingRangeLimit or same)
    rescale_missing: bool

    @property
    def rescale(self) -> Rescale:
        return Rescale(slope=self.slope, intercept=self.intercept, padding=self.padding)


def load_dicom_series(
    root: Path,
    files: Sequence[str],
    *,
    config: SelectionConfig | None = None,
    max_voxels: int = MAX_VOXELS,
    limits: Limits | None = None,
    blobs: Mapping[str, bytes] | None = None,
    keep_stored: bool = True,
) -> Volume:
    """Read and assemble the files of one series (paths relative to ``root``; zip members allowed; ``blobs``:
    the files' bytes by ref when they are already in memory, e.g. fetched from a PACS). ``keep_stored``: a series
    on a regular grid with one rescale keeps its stored values (``Volume.stored``, converted to HU where they are
    read); False converts every slice to HU now (the same numbers).

    Each file's Rows x Columns x NumberOfFrames is added up and checked against ``max_voxels`` before its
    pixels are decoded, so a header that claims a huge image fails the series without allocating it."""
    config = config or SelectionConfig()
    slices: list[_Slice] = []
    flags: list[str] = []
    claimed = 0
    with ZipFiles(limits=limits) as zips:  # each zip of the series opened once, not once per member
        for ref in files:
            ds, pixels = _read_slice(root, ref, zips=zips, blob=None if blobs is None else blobs[ref])
            try:
                frame = (
                    int(ds.get("NumberOfFrames", 1) or 1),
                    int(ds.get("Rows", 0) or 0),
                    int(ds.get("Columns", 0) or 0),
                )
            except (TypeError, ValueError):
                raise VolumeError("a slice has a malformed Rows, Columns or NumberOfFrames") from None
            claimed += check_voxel_count(frame, max_voxels=max_voxels, what="a slice header")
            if claimed > max_voxels:
                raise VolumeError(f"the series' headers claim over {max_voxels:,} voxels in all (--max-voxels)")
            slices.extend(_slices_of(ds, pixels=pixels))
    if not slices:
        raise VolumeError("no image slices")
    if any(s.rescale_missing for s in slices):
        flags.append("rescale_missing")
    return assemble(slices, flags=flags, config=config, max_voxels=max_voxels, keep_stored=keep_stored)


def _read_slice(
    root: Path, ref: str, *, zips: ZipFiles, blob: bytes | None = None
) -> tuple[pydicom.Dataset, StoredPixels | None]:
    """One file's header and, for an uncompressed single-frame slice, where its stored values lie, to be read
    straight into the volume (:mod:`hctembed.io.dicom_native`); other files come back with None, to be decoded by
    pydicom. ``blob``: the file's bytes when they are in memory already."""
    member = blob  # a zip member is inflated once, for either reader
    try:
        if blob is not None:
            native = read_native(blob)
        elif split_ref(ref) is None:
            native = read_native(root / ref)
        else:
            member = zips.read(root, ref)
            native = read_native(member)
    except (OSError, VolumeError, NotImplementedError, RuntimeError):
        native = None  # the full reader below says what is wrong, as one line
    if native is not None:
        return native
    try:
        return read_dataset(root, ref, pixels=True, zips=zips, member=member), None
    except HeaderError as exc:
        raise VolumeError(f"unreadable slice file: {exc}") from None


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


def _slices_of(ds: pydicom.Dataset, *, pixels: np.ndarray | StoredPixels | None = None) -> list[_Slice]:
    """The slices of one file; ``pixels``: its stored values or where they lie (else decoded here)."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = _decode(ds) if pixels is None else pixels
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
    slices: list[_Slice],
    *,
    flags: list[str],
    config: SelectionConfig,
    max_voxels: int = MAX_VOXELS,
    keep_stored: bool = True,
) -> Volume:
    """Order, check and stack slices into a RAS Volume (see the module docstring for the rules)."""
    first = slices[0]
    orientations = np.array([s.orientation for s in slices])  # [K, 6]: one check for the series, not one a slice
    if any(s.raw.shape != first.raw.shape for s in slices) or not np.allclose(orientations, first.orientation,
                                                                              atol=1e-3):  # fmt: skip
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
    hu = None
    if "rescale_missing" in flags:  # are the values HU without a rescale? (every voxel, as before: a rare case)
        hu = _hu_of(slices)
        if np.percentile(hu, 1) > -500:
            raise VolumeError("no RescaleSlope/Intercept and no air below -500: stored values are not HU")
    targets, step = slice_grid(distance, config=config, flags=flags)
    positions = np.array([s.position for s in slices])
    plane = in_plane_grid(
        positions, normal=normal, row_dir=row_dir, col_dir=col_dir, spacing=first.spacing, shape=first.raw.shape
    )
    stack = None
    rescale = first.rescale
    uniform = all(s.rescale == rescale and s.raw.dtype == first.raw.dtype for s in slices)
    if hu is None and keep_stored and targets is None and plane is None and uniform:
        # a regular grid with one rescale (most series): the stored words go straight into one buffer, and become
        # HU where they are read (Volume.stored): the checks' sample, the resample's slabs
        stored = np.empty((len(slices), *first.raw.shape), first.raw.dtype)  # [k, rows, cols]
        for k, s in enumerate(slices):
            _read_into(s, out=stored[k])
        voxels = stored
    else:
        stored = None
        if targets is not None or plane is not None:
            shape = plane.shape if plane is not None else first.raw.shape
            regular_slices = len(targets) if targets is not None else len(distance)
            check_voxel_count((max(regular_slices, len(distance)), *shape), max_voxels=max_voxels,
                              what="the resampled grid")  # fmt: skip
        voxels = _hu_of(slices) if hu is None else hu
    if targets is not None or plane is not None:
        # the slices stay as stored (moved by whole pixels onto the grown field of view) with their true
        # positions: the preprocessing interpolates once from those to its grid (Volume.stack)
        shifts = np.zeros((len(distance), 2))
        if plane is not None:
            voxels, shifts = place_whole(voxels, shift=plane.shift, shape=plane.shape)
            flags.append(f"gantry_tilt_corrected:{plane.angle:.1f}deg")
        step = float((distance[-1] - distance[0]) / (len(distance) - 1))  # the stack's mean spacing
        along = (distance - distance[0]) / step
        lattice = along if targets is None else (targets - distance[0]) / step
        stack = SliceStack(positions=along, shifts=shifts, targets=lattice)
    low = plane.low if plane is not None else np.zeros(2)
    # grid origin: the first slice's, moved to the enlarged field of view's corner
    origin = slices[0].position + low[1] * first.spacing[1] * row_dir + low[0] * first.spacing[0] * col_dir
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * first.spacing[1]  # along a row: columns, spacing between columns
    affine_lps[:3, 1] = col_dir * first.spacing[0]  # down a column: rows, spacing between rows
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = origin
    affine = LPS_TO_RAS @ affine_lps
    check_affine(affine)
    ras = ras_orientation(affine, voxels.shape[::-1])
    if stack is not None and ras.order[2] != 2:
        # a sagittal or coronal stack: its slices do not stay the slowest axis, so blend them onto a regular
        # lattice here (two interpolations, as before the stack was kept)
        lattice = regular(Volume(array=voxels, affine=affine, stack=stack))
        voxels, affine, stack = lattice.array, lattice.affine, None
        ras = ras_orientation(affine, voxels.shape[::-1])
    n_slices = int(voxels.shape[0])
    array_xyz, affine_ras, codes = reorient(voxels.transpose(2, 1, 0), ras), ras.affine, ras.codes
    if stack is not None:
        stack = stack.reoriented(n_slices=n_slices, swap_yx=ras.order[0] == 1, flip_z=ras.flips[2],
                                 flip_y=ras.flips[1], flip_x=ras.flips[0])  # fmt: skip
    meta = {
        "format": "dicom",
        "source_axcodes": "".join(codes),
        "flags": flags,
        "n_slices": n_slices,
    }
    if stored is not None:
        values = StoredValues.of(buffer=stored, values=array_xyz.transpose(2, 1, 0), rescale=rescale)
        return Volume(stored=values, affine=affine_ras, meta=meta)
    return Volume(array=array_xyz.transpose(2, 1, 0), affine=affine_ras, meta=meta, stack=stack)


def _hu_of(slices: list[_Slice]) -> np.ndarray:
    """The slices in HU, float32 ``[k, rows, cols]``, each with its own rescale, through one reused slice buffer."""
    first = slices[0]
    hu = np.empty((len(slices), *first.raw.shape), np.float32)  # filled slice by slice
    buffers: dict[np.dtype, np.ndarray] = {}  # one reused slice of stored values per dtype: stays in cache
    for k, s in enumerate(slices):
        s.rescale.apply(_stored_values(s, buffers=buffers), out=hu[k])
    return hu


def _stored_values(s: _Slice, *, buffers: dict[np.dtype, np.ndarray]) -> np.ndarray:
    """``s``'s stored values ``[rows, cols]``: the decoded array, or a file's words read into the reused buffer of
    their dtype (valid until the next slice of that dtype is read)."""
    if isinstance(s.raw, np.ndarray):
        return s.raw
    buffer = buffers.get(s.raw.dtype)
    if buffer is None or buffer.shape != s.raw.shape:
        buffer = buffers[s.raw.dtype] = np.empty(s.raw.shape, s.raw.dtype)
    return _read_into(s, out=buffer)


def _read_into(s: _Slice, *, out: np.ndarray) -> np.ndarray:
    """``s``'s stored values written into ``out [rows, cols]`` (of their dtype): copied from the decoded array, or
    read from the file straight in."""
    if isinstance(s.raw, np.ndarray):
        out[...] = s.raw
        return out
    return s.raw.read_into(out)


def _values(s: _Slice) -> np.ndarray:
    """``s``'s stored values in an array of their own."""
    return s.raw if isinstance(s.raw, np.ndarray) else s.raw.read()


def _merge_duplicates(slices, distance, *, flags):
    keep = [0]
    merged = 0
    for i in range(1, len(slices)):
        if abs(distance[i] - distance[keep[-1]]) < 1e-3:
            if np.array_equal(_values(slices[i]), _values(slices[keep[-1]])):
                merged += 1
                continue
            raise VolumeError(f"two different slices at one position ({distance[i]:.1f} mm along the normal)")
        keep.append(i)
    if merged:
        flags.append(f"duplicate_positions_merged:{merged}")
    return [slices[i] for i in keep], distance[keep]
