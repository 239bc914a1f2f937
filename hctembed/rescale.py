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
    """A volume's voxels as stored: ``buffer`` (C-contiguous, as the slices were read), the view of it that is the
    volume (``layout``: first element, shape ``[Z, Y, X]`` and strides in elements, any signs: the closest-RAS
    axes; :meth:`of` takes the view itself), and the :class:`Rescale` that makes them HU. Indexed like the HU array
    it stands for: ``stored[key]`` is the float32 HU of ``values[key]`` (a sample's worth converted, not the
    volume), and :meth:`hu_array` the whole HU array with ``values``' layout. Holding the layout rather than a view
    keeps it right through pickling and copies, which do not keep a view inside its base."""

    buffer: np.ndarray
    layout: tuple[int, tuple[int, ...], tuple[int, ...]]
    rescale: Rescale

    @classmethod
    def of(cls, *, buffer: np.ndarray, values: np.ndarray, rescale: Rescale) -> StoredValues:
        """``values``, a view of ``buffer`` (C-contiguous), held as its layout over the buffer."""
        if not buffer.flags.c_contiguous or values.dtype != buffer.dtype or values.base is None:
            raise ValueError("values must be a view of a C-contiguous buffer of its dtype")
        size = buffer.itemsize
        start = values.__array_interface__["data"][0] - buffer.__array_interface__["data"][0]
        layout = (start // size, tuple(values.shape), tuple(s // size for s in values.strides))
        stored = cls(buffer=buffer, layout=layout, rescale=rescale)
        if _where(stored.values) != _where(values):  # the same memory, shape and strides (nothing compared)
            raise ValueError("values is not a view of buffer")
        return stored

    def __post_init__(self) -> None:
        start, shape, strides = self.layout
        reach = [(n - 1) * s for n, s in zip(shape, strides, strict=True) if n > 0]
        lowest = start + sum(r for r in reach if r < 0)
        highest = start + sum(r for r in reach if r > 0)
        if lowest < 0 or highest >= self.buffer.size:
            raise ValueError(f"layout {self.layout} reaches outside a buffer of {self.buffer.size} values")

    def _view(self, flat: np.ndarray) -> np.ndarray:
        """The layout applied to ``flat`` (the buffer, or its HU, as one flat array)."""
        start, shape, strides = self.layout
        return np.lib.stride_tricks.as_strided(flat[start:], shape=shape,
                                               strides=tuple(s * flat.itemsize for s in strides))  # fmt: skip

    @property
    def values(self) -> np.ndarray:
        """The stored values ``[Z, Y, X]`` (a view of ``buffer``, made on each use: it is derived, never held)."""
        return self._view(self.buffer.reshape(-1))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout[1]

    @property
    def ndim(self) -> int:
        return len(self.layout[1])

    dtype = np.dtype(np.float32)  # of the HU it gives

    def __getitem__(self, key) -> np.ndarray:
        hu = self.rescale.hu(np.asarray(self.values[key]))
        return hu[()] if hu.ndim == 0 else hu  # one voxel: a float32 scalar, as an array's would be

    def hu_array(self) -> np.ndarray:
        """All of it in HU, float32 ``[Z, Y, X]``: the buffer converted, viewed with ``values``' layout (a new
        array each call: :attr:`hctembed.volume.Volume.array` keeps one)."""
        return self._view(self.rescale.hu(self.buffer).reshape(-1))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("stored values become an HU array only by converting them (a copy)")
        hu = self.hu_array()
        return hu if dtype is None else hu.astype(dtype, copy=False)


def _where(a: np.ndarray) -> tuple:
    interface = a.__array_interface__
    return interface["data"][0], a.shape, a.strides
