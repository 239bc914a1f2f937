"""Load NIfTI files (``.nii``, ``.nii.gz``) as RAS-oriented HU volumes without copying the voxels."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np

from hctembed.volume import MAX_VOXELS, Volume, VolumeError, check_affine, check_voxel_count, orient_to_ras

try:  # Intel ISA-L's inflate; zlib (through nibabel) where the wheel is missing
    from isal import igzip as _igzip
    from isal import isal_zlib as _igzip_zlib
except ImportError:  # pragma: no cover - depends on the platform
    _igzip = _igzip_zlib = None

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def load_nifti(path: str | Path, *, max_voxels: int = MAX_VOXELS) -> Volume:
    """Read a 3D NIfTI CT as a :class:`Volume` in closest-RAS orientation.

    The voxels are scaled by the header's slope/intercept to float32 HU. Reorientation is a strided view
    (flips and axis swaps), so the only full-size work is decompression and the float conversion.

    Raises:
        VolumeError: unreadable file, not 3D (a 4D file with one volume is accepted), more voxels than
            ``max_voxels`` (checked on the header, before reading), non-finite voxels, or a degenerate /
            non-orthonormal affine.
    """
    path = Path(path)
    img, shape = open_image(path, max_voxels=max_voxels)
    affine = header_affine(img)
    check_affine(affine)
    try:
        data, slope, inter = _voxels(path, img)
    except VolumeError:
        raise
    except Exception as exc:
        raise VolumeError(f"unreadable NIfTI voxel data ({type(exc).__name__}: {exc})") from exc
    data = data.reshape(shape, order="A")
    # float32 voxels are used as they are unless read-only (viewing the inflated buffer) or to be scaled
    copy = data.dtype != np.float32 or not data.flags.writeable or (slope, inter) != (1.0, 0.0)
    hu = data.astype(np.float32, order="K") if copy else data
    if (slope, inter) != (1.0, 0.0):
        hu *= np.float32(slope)
        hu += np.float32(inter)
    if data.dtype.kind == "f" and not np.isfinite(hu).all():  # integer voxels are finite: skip the pass
        n_bad = int(np.size(hu) - np.count_nonzero(np.isfinite(hu)))
        raise VolumeError(f"{n_bad} non-finite voxels (NaN or inf)")
    array_xyz, affine_ras, codes = orient_to_ras(hu, affine)
    # [x, y, z] -> [z, y, x]: a transposed view of the Fortran-ordered buffer, C-contiguous when unflipped.
    array = array_xyz.transpose(2, 1, 0)
    meta = {
        "format": "nifti",
        "source_axcodes": "".join(codes),
        "source_shape_xyz": [int(s) for s in shape],
        "source_dtype": str(data.dtype),
    }
    return Volume(array=array, affine=affine_ras, meta=meta)


def open_image(path: Path, *, max_voxels: int = MAX_VOXELS) -> tuple[nib.Nifti1Image, tuple[int, int, int]]:
    """The parsed image (voxels not read yet) and its 3D shape; VolumeError for what is not a 3D NIfTI or
    claims more than ``max_voxels`` voxels."""
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken files
        raise VolumeError(f"unreadable NIfTI ({type(exc).__name__}: {exc})") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeError(f"not a NIfTI image ({type(img).__name__})")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(f"not a 3D volume: shape {tuple(img.shape)}")
    if min(shape) < 2:
        raise VolumeError(f"not a 3D volume: shape {tuple(img.shape)} has a singleton axis")
    check_voxel_count(shape, max_voxels=max_voxels)
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf" or dtype.fields:
        raise VolumeError(f"voxel type {dtype.name if not dtype.fields else 'RGB'} is not a CT intensity")
    if not path.name.lower().endswith(".gz"):  # a plain file must hold what its header claims
        needed = int(img.dataobj.offset) + int(np.prod(shape, dtype=np.int64)) * img.get_data_dtype().itemsize
        size = path.stat().st_size
        if size < needed:
            raise VolumeError(f"unreadable NIfTI voxel data (truncated: {size} bytes, the header needs {needed})")
    return img, tuple(int(s) for s in shape)


def _voxels(path: Path, img: nib.Nifti1Image) -> tuple[np.ndarray, float, float]:
    """The stored voxels ``[x, y, z]`` (Fortran order, file dtype) and the header's slope and intercept.

    A ``.nii.gz`` is inflated in one call with ISA-L (``isal``; about twice zlib's speed) into one buffer that
    the array views without a copy; uncompressed files and systems without ``isal`` go through nibabel
    (a memory map, or zlib). nibabel has already parsed the header, which gives the data offset and dtype.
    """
    proxy = img.dataobj
    slope, inter = float(proxy.slope), float(proxy.inter)
    if not path.name.lower().endswith(".gz") or _igzip is None:
        return np.asanyarray(proxy.get_unscaled()), slope, inter
    dtype = img.get_data_dtype()
    count = int(np.prod(img.shape))
    buffer = _inflate_at_most(path, proxy.offset + count * dtype.itemsize)
    if len(buffer) < proxy.offset + count * dtype.itemsize:
        raise VolumeError(
            f"unreadable NIfTI voxel data (truncated: {max(len(buffer) - proxy.offset, 0)} bytes, the header "
            f"needs {count * dtype.itemsize})"
        )
    data = np.frombuffer(buffer, dtype=dtype, count=count, offset=proxy.offset)
    return data.reshape(img.shape, order="F"), slope, inter


def _inflate_at_most(path: Path, limit: int) -> np.ndarray:
    """Inflate a gzip file into one buffer of at most ``limit`` bytes (uint8 ``[<= limit]``): what follows the
    voxels the header declares is never held, so a small file that inflates to gigabytes (a gzip bomb)
    costs no more memory than its header says, and the header's size was checked before. The member holding
    the last voxels is inflated on to its end (output dropped a megabyte at a time), so its CRC is checked,
    unless it holds more than :func:`trailing_slack` past the image: then the file is refused there, without
    inflating the rest."""
    out = np.empty(limit, np.uint8)
    filled, chunk, fresh = 0, b"", True
    inflater = _igzip_zlib.decompressobj(31)
    with open(path, "rb") as f:
        while filled < limit and (chunk := f.read(1 << 22)):
            while chunk and filled < limit:
                if fresh and not chunk.strip(b"\x00"):  # zero padding after the last member
                    chunk = b""
                    break
                piece = inflater.decompress(chunk, limit - filled)
                fresh = False
                out[filled : filled + len(piece)] = np.frombuffer(piece, np.uint8)
                filled += len(piece)
                chunk = inflater.unconsumed_tail
                if inflater.eof:  # a multi-member gzip: the next member starts in unused_data
                    chunk, inflater, fresh = inflater.unused_data, _igzip_zlib.decompressobj(31), True
                    if not chunk.strip(b"\x00"):
                        chunk = b""
        if filled == limit and not fresh:  # the member holding the last voxels: on to its checksum
            extra, slack = 0, trailing_slack(limit)
            while not inflater.eof:
                if not chunk and not (chunk := f.read(1 << 22)):
                    raise VolumeError("unreadable NIfTI voxel data (the gzip stream ends before its checksum)")
                extra += len(inflater.decompress(chunk, 1 << 20))
                chunk = inflater.unconsumed_tail
                if extra > slack:
                    raise trailing_error(slack)
    return out[:filled]


def trailing_slack(image_bytes: int) -> int:
    """How many bytes past the image its header declares a gzip member may still inflate to before the file is
    refused: 1 MiB, or 1 % of the image (a file's own padding and extensions), not gigabytes of zeros."""
    return max(1 << 20, image_bytes // 100)


def trailing_error(slack: int) -> VolumeError:
    return VolumeError(
        f"the gzip stream inflates to over {slack / 2**20:.0f} MiB more than the image its header declares "
        "(a gzip bomb or a damaged file)"
    )


def header_affine(img: nib.Nifti1Image) -> np.ndarray:
    """The sform when set, else the qform, else refuse (the fall-back affine has no real geometry)."""
    header = img.header
    sform, s_code = header.get_sform(coded=True)
    qform, q_code = header.get_qform(coded=True)
    if s_code and s_code > 0 and sform is not None:
        affine = sform
        if q_code and q_code > 0 and qform is not None and not np.allclose(sform, qform, atol=1e-3):
            log.warning("sform and qform disagree; using the sform (as nibabel and dcm2niix do)")
    elif q_code and q_code > 0 and qform is not None:
        affine = qform
    else:
        raise VolumeError("no sform or qform: the file has no world geometry")
    return np.asarray(affine, dtype=np.float64)
