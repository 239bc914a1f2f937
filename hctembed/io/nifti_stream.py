"""Read a ``.nii.gz`` slice slab by slice slab while it is still being inflated.

Inflating a thin-slice CT is the largest single cost of preprocessing it (0.4 s of ISA-L for a
512×512×170 int16 file here), and gzip is sequential. The voxels of an axial NIfTI are stored slice after
slice, though, so whole slices become available long before the file is done: :func:`open_stream` parses
the header, and :meth:`NiftiStream.slabs` inflates in a background thread (ISA-L releases the GIL) while
the caller converts and resamples the slices already there. Only files whose stored axes need no
permutation to become RAS (flips are fine) are streamed; others return ``None`` and are loaded whole.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hctembed.io.nifti import header_affine, open_image, trailing_error, trailing_slack
from hctembed.volume import MAX_VOXELS, VolumeError, check_affine, ras_orientation

try:
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - depends on the platform
    import zlib as _zlib

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # compressed bytes per read
INFLATE_THREAD = "hctembed-inflate"


@dataclass(frozen=True)
class NiftiStream:
    """A ``.nii.gz`` ready to be read slab by slab; geometry as :func:`hctembed.io.nifti.load_nifti` gives it.

    ``affine`` and ``shape_xyz`` describe the closest-RAS volume; ``flips_zyx`` say which of its axes
    ``[Z, Y, X]`` run backwards in the file (the slabs come in file order).
    """

    path: Path
    affine: np.ndarray
    shape_xyz: tuple[int, int, int]
    flips_zyx: tuple[bool, bool, bool]
    dtype: np.dtype
    offset: int
    slope: float
    inter: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    def slabs(self, *, slices: int = 8) -> Iterator[tuple[int, np.ndarray]]:
        """``(first slice, float32 HU [n, Y, X])`` in file order, ``n`` ≤ ``slices``, as inflating goes.

        Raises VolumeError when the file ends early, is corrupt, or holds non-finite values.
        """
        nx, ny, nz = self.shape_xyz
        slice_bytes = nx * ny * self.dtype.itemsize
        total = self.offset + nz * slice_bytes
        buffer = np.empty(total, np.uint8)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(
            target=_inflate, args=(self.path, buffer, slice_bytes, ready, stop), daemon=True, name=INFLATE_THREAD
        )
        worker.start()
        try:
            done = 0  # slices handed out
            finished = False
            while not finished:
                kind, value = ready.get()
                if kind == "error":
                    if isinstance(value, MemoryError | VolumeError):
                        raise value
                    raise VolumeError(f"unreadable NIfTI voxel data ({type(value).__name__}: {value})")
                finished = kind == "end"
                available = min(nz, max(0, (value - self.offset) // slice_bytes))
                if finished and available < nz:
                    raise VolumeError(
                        f"unreadable NIfTI voxel data (truncated: {available} of {nz} slices in the file)"
                    )
                while done < available:
                    n = min(slices, available - done)
                    raw = buffer[self.offset + done * slice_bytes : self.offset + (done + n) * slice_bytes]
                    slab = raw.view(self.dtype).reshape(n, ny, nx).astype(np.float32)
                    if (self.slope, self.inter) != (1.0, 0.0):
                        slab *= np.float32(self.slope)
                        slab += np.float32(self.inter)
                    if self.dtype.kind == "f" and not np.isfinite(slab).all():
                        raise VolumeError("non-finite voxels (NaN or inf)")
                    yield done, slab
                    done += n
        finally:  # also when the caller stops early: the thread stops at its next read
            stop.set()
            worker.join()


def _inflate(path: Path, buffer: np.ndarray, slice_bytes: int, ready: queue.Queue, stop: threading.Event) -> None:
    """Inflate ``path`` into ``buffer``, telling ``ready`` how many bytes are there: ``("progress", n)`` after
    each new whole slice; at the end of the file ``("end", n)`` once every gzip member's checksum has been
    verified, or ``("error", exception)``. Each call inflates at most a few megabytes (``max_length``), so a
    member of gigabytes of zeros never sits in memory at once; past the buffer's end at most
    :func:`~hctembed.io.nifti.trailing_slack` bytes are inflated (to reach the checksum) before the file is
    refused as a gzip bomb. Stops early when ``stop`` is set."""
    filled = last_reported = extra = 0
    step = max(slice_bytes, CHUNK)
    slack = trailing_slack(len(buffer))
    try:
        with open(path, "rb") as f:
            inflater, started = _zlib.decompressobj(31), False  # gzip: each member's CRC is checked at its end
            while not stop.is_set() and (data := f.read(CHUNK)):
                capped = False  # the last call filled its max_length: output may be pending without more input
                while (data or capped) and not stop.is_set():
                    if not started and not data.strip(b"\x00"):
                        break  # zero padding after the last member
                    started = True
                    room = len(buffer) - filled
                    cap = max(min(room, 4 * CHUNK), 0) or CHUNK
                    out = inflater.decompress(data, cap)
                    capped = len(out) == cap
                    n = min(room, len(out))
                    if n > 0:
                        buffer[filled : filled + n] = np.frombuffer(out, np.uint8, count=n)
                        filled += n
                    extra += len(out) - n
                    if extra > slack:
                        raise trailing_error(slack)
                    data = inflater.unconsumed_tail
                    if inflater.eof:  # the next member (multi-member gzip) starts in unused_data or the next read
                        data, capped = inflater.unused_data, False
                        inflater, started = _zlib.decompressobj(31), False
                    if filled - last_reported >= step:
                        ready.put(("progress", filled))
                        last_reported = filled
            if started and not stop.is_set():
                raise EOFError("the gzip stream ends before its last member does")
    except Exception as exc:  # corrupt data (the reader raises a VolumeError) or MemoryError (re-raised)
        ready.put(("error", exc))
        return
    ready.put(("end", filled))


def open_stream(path: str | Path, *, max_voxels: int = MAX_VOXELS) -> NiftiStream | None:
    """Parse a ``.nii.gz`` header for streaming; ``None`` when the file is not gzip or its axes are permuted
    relative to RAS (load it whole). Raises VolumeError as :func:`load_nifti` does for bad headers."""
    path = Path(path)
    if not path.name.lower().endswith(".nii.gz"):
        return None
    img, shape = open_image(path, max_voxels=max_voxels)
    affine = header_affine(img)
    check_affine(affine)
    ras = ras_orientation(affine, shape)
    if ras.order != (0, 1, 2):
        return None
    proxy = img.dataobj
    dtype = img.get_data_dtype()
    if dtype.kind not in "iuf":
        return None
    flips_xyz = ras.flips
    meta = {
        "format": "nifti",
        "source_axcodes": "".join(ras.codes),
        "source_shape_xyz": [int(s) for s in shape],
        "source_dtype": str(dtype),
    }
    return NiftiStream(
        path=path,
        affine=ras.affine,
        shape_xyz=tuple(int(s) for s in shape),
        flips_zyx=(flips_xyz[2], flips_xyz[1], flips_xyz[0]),
        dtype=dtype,
        offset=int(proxy.offset),
        slope=float(proxy.slope),
        inter=float(proxy.inter),
        meta=meta,
    )
