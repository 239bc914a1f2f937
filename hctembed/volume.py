"""The in-memory CT volume that every loader returns and preprocessing consumes."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from hctembed.errors import HctembedError
from hctembed.rescale import StoredValues


class VolumeError(HctembedError, ValueError):
    """A scan that cannot be used; the message says why (it becomes a recorded skip reason)."""


class SkipError(VolumeError):
    """A scan that is not what an archive is embedded for: recorded as skipped with ``code``, not as a failure."""

    code = "skipped"


class SourceUnavailable(HctembedError):
    """The archive itself stopped answering (a PACS that cannot be reached after retries): the run stops with
    one line, keeping every batch it stored, and a re-run resumes. Never one scan's failure."""


_CONVERTING = threading.Lock()  # held only to publish a converted array, never while converting


@dataclass(frozen=True, eq=False, init=False)
class Volume:
    """A CT volume in Hounsfield units, oriented to the closest RAS axes.

    Built with ``Volume(array=..., affine=...)`` (HU as given) or ``Volume(stored=..., affine=...)`` (the voxels as
    a DICOM series stores them, converted to HU where they are read).

    Attributes:
        array: float32 HU, shape ``[Z, Y, X]``; ``array[z, y, x]`` is voxel index ``(x, y, z)``.
            May be a strided view of the file's buffer (no copy); never write to it. A volume built from
            ``stored`` converts it on first use (and keeps it).
        affine: float64 ``[4, 4]`` mapping voxel index ``(x, y, z, 1)`` to RAS world millimetres
            (the NIfTI convention, so ``affine @ [x, y, z, 1]``). Its columns point along +R, +A, +S
            as closely as the acquisition allows; oblique scans keep their rotation here.
        meta: PHI-free facts about the source (format, original orientation code, spacing, ...).
        stack: None for a regular grid. For a DICOM stack whose slices are not on one (slice zones of different
            spacing, gantry tilt), the slices as stored with their true positions (:class:`SliceStack`): the
            paper preprocessing interpolates once from those to its 1 mm grid; :func:`hctembed.io.slice_grid.regular`
            gives everything else a regular grid.
        stored: None, or the voxels as the files store them, with their rescale
            (:class:`hctembed.rescale.StoredValues`: a series on a regular grid with one rescale). The checks
            (:attr:`voxels`) and the resample read these, converting a sample or a slab at a time: the HU of the
            whole volume (twice the bytes of the stored words) is never written unless ``array`` is asked for.
    """

    affine: np.ndarray
    meta: dict[str, Any]
    stack: SliceStack | None
    stored: StoredValues | None

    def __init__(
        self,
        *,
        affine: np.ndarray,
        array: np.ndarray | None = None,
        stored: StoredValues | None = None,
        meta: dict[str, Any] | None = None,
        stack: SliceStack | None = None,
    ) -> None:
        if (array is None) == (stored is None):
            raise TypeError("a Volume is built from either array (HU) or stored (values and rescale), not both")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "meta", {} if meta is None else meta)
        object.__setattr__(self, "stack", stack)
        object.__setattr__(self, "stored", stored)
        object.__setattr__(self, "_hu", array)

    @property
    def array(self) -> np.ndarray:
        if self._hu is None:  # converted once; two threads racing both convert, and both keep the first
            hu = self.stored.hu_array()
            with _CONVERTING:
                if self._hu is None:
                    object.__setattr__(self, "_hu", hu)
        return self._hu

    @property
    def voxels(self) -> np.ndarray | StoredValues:
        """The HU voxels ``[Z, Y, X]`` to index (``voxels[::2, ::4, ::4]`` is float32 HU): ``array`` when it is held,
        else the stored values, which convert only what is indexed."""
        return self.stored if self._hu is None else self._hu

    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.voxels.shape
        return (x, y, z)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        """Voxel size in mm along the x, y, z array axes."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))


@dataclass(frozen=True)
class SliceStack:
    """Where a volume's stored slices truly lie, in its own voxel index units (axis z is the slice axis):
    stored voxel ``[k, j, i]`` sits at index ``(positions[k], j + shifts[k, 0], i + shifts[k, 1])``. ``positions
    [K]`` increase (not evenly: zones); ``shifts [K, 2]`` (y, x) are under a voxel (the tilt's drift less the whole
    voxels by which each slice was placed); ``targets [M]`` is the regular lattice along z that
    :func:`hctembed.io.slice_grid.regular` blends onto (the finest zone's spacing, through its slices)."""

    positions: np.ndarray
    shifts: np.ndarray
    targets: np.ndarray

    def reoriented(self, *, n_slices: int, swap_yx: bool, flip_z: bool, flip_y: bool, flip_x: bool) -> SliceStack:
        """The same stack after the volume's axes were permuted (y and x swapped) and flipped."""
        shifts = self.shifts[:, ::-1] if swap_yx else self.shifts
        shifts = shifts * np.array([-1.0 if flip_y else 1.0, -1.0 if flip_x else 1.0])
        positions, targets = self.positions, self.targets
        if flip_z:
            positions, targets, shifts = (n_slices - 1) - positions[::-1], (n_slices - 1) - targets[::-1], shifts[::-1]
        return SliceStack(positions=np.ascontiguousarray(positions), shifts=np.ascontiguousarray(shifts),
                          targets=np.ascontiguousarray(targets))  # fmt: skip


MAX_VOXELS = 1024 * 1024 * 2000  # the default limit: a 1024x1024 matrix with 2,000 slices


def check_voxel_count(shape: tuple[int, ...], *, max_voxels: int, what: str = "the header") -> int:
    """The voxel count of ``shape``, or a VolumeError when it is over ``max_voxels``: checked before anything of
    that size is allocated, so a header that claims a huge image costs nothing."""
    count = 1
    for n in shape:
        count *= max(int(n), 0)
    if count > max_voxels:
        dims = "x".join(str(int(n)) for n in shape)
        raise VolumeError(f"{what} claims {count:,} voxels ({dims}), over the limit of {max_voxels:,} (--max-voxels)")
    return count


def check_affine(affine: np.ndarray, *, tolerance: float = 1e-3) -> None:
    """Raise VolumeError unless ``affine`` is a finite 4x4 with non-zero spacing and orthogonal axes."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise VolumeError("affine is not a finite 4x4 matrix")
    if not np.allclose(a[3], [0, 0, 0, 1]):
        raise VolumeError(f"affine's last row is {a[3].tolist()}, not [0, 0, 0, 1]")
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(spacing < 1e-6):
        raise VolumeError(f"degenerate affine: voxel spacing {spacing.round(6).tolist()} mm has a zero")
    directions = a[:3, :3] / spacing
    gram = directions.T @ directions
    if not np.allclose(gram, np.eye(3), atol=tolerance):
        worst = float(np.max(np.abs(gram - np.eye(3))))
        raise VolumeError(
            f"non-orthonormal affine: voxel axes are sheared (max |cos| between axes {worst:.4f}); "
            "resample the series onto an orthogonal grid first"
        )


@dataclass(frozen=True)
class RasOrientation:
    """How stored voxel axes ``[x, y, z]`` become closest-RAS ones: ``order[i]`` is the stored axis that
    becomes axis ``i``, ``flips[i]`` whether it is then reversed; ``affine`` maps the reoriented indices."""

    order: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    affine: np.ndarray
    codes: tuple[str, ...]


def ras_orientation(affine: np.ndarray, shape_xyz: tuple[int, ...]) -> RasOrientation:
    """The permutation and flips that bring voxel axes closest to +R, +A, +S (no voxels involved)."""
    import nibabel as nib
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    ornt = io_orientation(affine)
    codes = tuple(nib.orientations.ornt2axcodes(ornt))  # aff2axcodes(affine), without a second io_orientation
    transform = ornt_transform(ornt, axcodes2ornt(("R", "A", "S")))
    # transform[i] = (new axis for input axis i, flip)
    order = np.argsort(transform[:, 0])
    new_affine = np.asarray(affine, dtype=np.float64).copy()
    new_affine[:, :3] = new_affine[:, :3][:, order]
    flips = transform[order, 1] < 0
    for axis, flip in enumerate(flips):
        if flip:
            n = shape_xyz[order[axis]]
            new_affine[:3, 3] = new_affine[:3, 3] + new_affine[:3, axis] * (n - 1)
            new_affine[:3, axis] = -new_affine[:3, axis]
    return RasOrientation(
        order=tuple(int(o) for o in order), flips=tuple(bool(f) for f in flips), affine=new_affine, codes=codes
    )


def orient_to_ras(array_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Permute/flip voxel axes (views only) so they point along +R, +A, +S as closely as possible.

    Args:
        array_xyz: voxels indexed ``[x, y, z]`` as ``affine`` maps them.
    Returns:
        (the reoriented ``[x, y, z]`` view, its affine, the source's axis codes such as ``("L", "P", "S")``).
    """
    ras = ras_orientation(affine, array_xyz.shape)
    return reorient(array_xyz, ras), ras.affine, ras.codes


def reorient(array_xyz: np.ndarray, ras: RasOrientation) -> np.ndarray:
    """``array_xyz`` permuted and flipped as ``ras`` says (a view)."""
    out = array_xyz.transpose(ras.order)
    for axis, flip in enumerate(ras.flips):
        if flip:
            out = np.flip(out, axis=axis)
    return out
