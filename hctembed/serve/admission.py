"""What one uploaded query may cost the server, decided from its headers before its voxels are read.

Every upload goes through the same admission path as an archive's files (:mod:`hctembed.io.admission`: zips
opened once and capped, headers read from their first bytes, gzip bombs refused, the 1 mm grid checked), with
the server's tighter limits:

* ``max_query_voxels``: the voxels a query's headers declare, and those of its 1 mm grid;
* a **memory budget** shared by the uploads being embedded at once: each reserves what its headers imply
  (:func:`estimated_bytes`) before it is read, and waits for room (``wait_s``), then gets 503 with
  ``Retry-After``; one that could never fit gets 400 at once. The process is never pushed into an OOM kill.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hctembed.errors import HctembedError, InputError
from hctembed.io.admission import ZipFiles
from hctembed.serve.limits import QueryLimits
from hctembed.volume import VolumeError

BYTES_PER_SOURCE_VOXEL = 8  # the stored voxels and their float32 HU copy
BYTES_PER_GRID_VOXEL = 8  # the 1 mm float32 grid and one working copy
FIXED_BYTES = 64 << 20  # model input, encoder activations of one scan, buffers


class ServerBusy(HctembedError):
    """The server is at its memory budget for queries: answered 503 with Retry-After."""

    exit_code = 2


def estimated_bytes(path: Path, *, limits: QueryLimits, spacing_mm: float | None) -> int:
    """The memory embedding the upload at ``path`` will take, from its headers alone; VolumeError when its
    headers (or zip) are over the limits."""
    from hctembed.io.nifti import header_affine, is_nifti, open_image
    from hctembed.preprocessing.series import resampled_shape
    from hctembed.volume import check_affine, ras_orientation

    file_limits = limits.file_limits()
    if is_nifti(path):
        limit = file_limits.max_voxels
        img, shape = open_image(path, max_voxels=limit)
        source = shape[0] * shape[1] * shape[2]
        grid = 0
        if spacing_mm:
            affine = header_affine(img)
            check_affine(affine)
            ras = ras_orientation(affine, shape)
            shape_ras = tuple(shape[i] for i in ras.order)
            grid_shape = resampled_shape(
                ras.affine, shape_ras, spacing_mm=spacing_mm, max_voxels=file_limits.max_voxels
            )
            grid = int(grid_shape.prod())
        return source * BYTES_PER_SOURCE_VOXEL + grid * BYTES_PER_GRID_VOXEL + FIXED_BYTES
    with ZipFiles(limits=file_limits) as zips:  # a zip of one DICOM series: its members' declared sizes
        inflated = sum(i.file_size for i in zips.zip(path).infolist() if not i.is_dir())
    if inflated // 2 > file_limits.max_voxels:
        raise VolumeError(f"the upload's members hold about {inflated // 2:,} voxels, over {file_limits.max_voxels:,}")
    return (inflated // 2) * (BYTES_PER_SOURCE_VOXEL + BYTES_PER_GRID_VOXEL) + FIXED_BYTES


class MemoryBudget:
    """Bytes that concurrent queries reserve before they are read, and give back when done; thread-safe."""

    def __init__(self, *, total_bytes: int) -> None:
        self.total = total_bytes
        self.free = total_bytes
        self._room = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int, *, wait_s: float) -> Iterator[None]:
        """Hold ``nbytes`` while the block runs: waits up to ``wait_s`` for room (then ServerBusy); InputError
        when ``nbytes`` is over the whole budget."""
        if nbytes > self.total:
            raise InputError(
                f"this query needs about {nbytes / 2**20:,.0f} MB to embed, over the server's budget of "
                f"{self.total / 2**20:,.0f} MB for queries (--query-memory-mb)"
            )
        with self._room:
            if not self._room.wait_for(lambda: self.free >= nbytes, timeout=wait_s):
                raise ServerBusy("the server is embedding other queries; try again shortly")
            self.free -= nbytes
        try:
            yield
        finally:
            with self._room:
                self.free += nbytes
                self._room.notify_all()
