"""Stored values -> Hounsfield units: a scanner's rescale, its padding value and out-of-field values as air.

One element-wise transform, so a volume can keep the values as its files store them (16-bit words, read straight
into one buffer) and convert only what is looked at, a sample for the checks or a slab for the resample, with the
same float32 numbers, bit for bit, as converting the whole volume first (:class:`StoredValues`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AIR_HU = -1024.0


@dataclass(frozen=True)
class Rescale:
    """``HU = stored * slope + intercept`` in float32; stored values within ``padding`` (PixelPaddingValue and
    PixelPaddingRangeLimit, inclusive) and values below air are air."""

    slope: float
    intercept: float
    padding: tuple[float, float] | None = None

    def apply(self, stored: np.ndarray, *, out: np.ndarray) -> np.ndarray:
        """``stored`` (any shape, integer or float) -> float32 HU in ``out`` (same shape), returned.

        A slope of 1 (most CT) skips the multiply, and the clamp to air runs only when the lowest stored value
        maps below it (float32 arithmetic is monotonic, so the lowest value decides): the numbers of the three-pass
        formula, bit for bit, in one pass. Element-wise, so any block of a volume converts to the same values as
        that block of the whole volume converted at once."""
        slope, intercept = np.float32(self.slope), np.float32(self.intercept)
        if slope == 1 and stored.dtype.itemsize <= 2:  # x * 1 is x exactly (float32 holds every 16-bit value)
            np.add(stored, intercept, out=out, casting="unsafe")
        else:
            np.multiply(stored, slope, out=out, casting="unsafe")
            out += intercept
        if self.padding is not None:
            lo, hi = self.padding
            out[(stored >= lo) & (stored <= hi)] = AIR_HU
        if stored.size == 0:
            return out
        extreme = stored.min() if slope > 0 else stored.max()
        if slope <= 0 or np.float32(extreme) * slope + intercept < AIR_HU:
            np.maximum(out, AIR_HU, out=out)  # out-of-field values (-2048, -3024) are air
        return out

    def hu(self, stored: np.ndarray) -> np.ndarray:
        """``stored`` -> a new float32 HU array of its shape."""
        return self.apply(stored, out=np.empty(stored.shape, np.float32))


@dataclass(frozen=True, eq=False)
class StoredValues:
    """A volume's voxels as stored: ``buffer`` (C-contiguous, as the slices were read) and ``values [Z, Y, X]``, a
    view of it (any strides: the closest-RAS axes), with the :class:`Rescale` that makes them HU. Indexed like the
    HU array it stands for: ``stored[key]`` is the float32 HU of ``values[key]`` (a sample's worth converted, not
    the volume), and :meth:`hu_array` the whole HU array, laid out as ``values`` is (the same view of a float32
    buffer: what converting the slices as they were read gives)."""

    buffer: np.ndarray
    values: np.ndarray
    rescale: Rescale

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    dtype = np.dtype(np.float32)  # of the HU it gives

    def __getitem__(self, key) -> np.ndarray:
        return self.rescale.hu(np.asarray(self.values[key]))

    def hu_array(self) -> np.ndarray:
        """All of it in HU, float32 ``[Z, Y, X]``: the buffer converted, viewed with ``values``' layout."""
        hu = self.rescale.hu(self.buffer).reshape(-1)
        size = self.buffer.itemsize
        start = self.values.__array_interface__["data"][0] - self.buffer.__array_interface__["data"][0]
        strides = tuple(s // size * hu.itemsize for s in self.values.strides)
        return np.lib.stride_tricks.as_strided(hu[start // size :], shape=self.values.shape, strides=strides)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        hu = self.hu_array()
        return hu if dtype is None else hu.astype(dtype, copy=False)
