"""Uncompressed single-frame DICOM read at the decode floor: each file's header walked once, decoding only the
tags the assembly needs, and its pixel bytes copied straight into the slice's array.

Real scanner files carry hundreds of tags (125 per slice on the shared Philips series, most of them private)
that assembling a volume never looks at; pydicom parses every element into a Python object (about 1 ms a file
here, even when asked for a few tags) before its pixel handlers decode the values. :func:`parse_header` instead
steps over the elements of an explicit or implicit VR little-endian file by their lengths (sequences of
undefined length item by item), decodes only :data:`_WANTED` (as pydicom would: DS and IS strings to numbers,
US/SS by the VR or PixelRepresentation), and finds the pixel element; where its ``Rows x Columns`` 16-bit words
lie is kept (:class:`StoredPixels`), and the assembly reads them with ``readinto`` into one reused slice buffer,
from which they go to Hounsfield units in the volume (no array per slice: a 170-slice series no longer holds
89 MB of stored values beside its HU).

Anything else (compressed or big-endian transfer syntaxes, multi-frame or enhanced files, other bit depths,
colour, an element this walker does not take) returns None, and the caller reads the file through pydicom as
before. The values are the same as ``Dataset.pixel_array``'s and the volumes the same as pydicom's full read, bit
for bit (tests/test_dicom_native.py: every kind of DICOM the tests write, a zip, and the shared real series).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from hctembed.volume import VolumeError

NATIVE_SYNTAXES = {"1.2.840.10008.1.2.1": True, "1.2.840.10008.1.2": False}  # UID -> explicit VR


def read_native(source: Path | bytes | bytearray | memoryview | BinaryIO) -> tuple[NativeHeader, StoredPixels] | None:
    """``(header with the load tags, where its stored values lie)`` of an uncompressed single-frame slice (a file,
    or a zip member's or PACS instance's bytes), or None when it is anything else (the caller then reads it whole
    through pydicom). A file's pixels are not read here: :meth:`StoredPixels.read_into` reads them when the volume
    is filled, so that a series passes through one slice-sized buffer instead of an array per slice."""
    if isinstance(source, Path):
        with open(source, "rb") as f:
            head = f.read(HEAD_BYTES)
            size = os.fstat(f.fileno()).st_size
            parsed = parse_header(head)
            if parsed is None and len(head) == HEAD_BYTES:  # a header longer than the first read
                f.seek(0)
                parsed = parse_header(f.read())
        data: Path | bytes = source
    else:
        head = bytes(source) if isinstance(source, bytearray | memoryview) else source
        head = head if isinstance(head, bytes) else head.read()
        size, data = len(head), head
        parsed = parse_header(head)
    if parsed is None:
        return None
    ds, offset, length = parsed
    if "SOPInstanceUID" not in ds or not _plain_16_bit_slice(ds):
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    if length != rows * cols * 2 or offset + length > size:  # encapsulated, padded, odd sizes, or a short file
        return None
    signed = int(ds.PixelRepresentation) == 1
    return ds, StoredPixels(source=data, offset=offset, shape=(rows, cols), dtype=np.dtype("<i2" if signed else "<u2"),
                            bits_stored=int(ds.BitsStored))  # fmt: skip


@dataclass(frozen=True, eq=False)
class StoredPixels:
    """Where one uncompressed slice's ``Rows x Columns`` 16-bit stored values lie: a file and byte offset, or bytes
    in memory (a zip member, a PACS instance). ``shape``, ``dtype`` and ``ndim`` read like the array's."""

    source: Path | bytes
    offset: int
    shape: tuple[int, int]
    dtype: np.dtype
    bits_stored: int
    ndim = 2

    def read_into(self, out: np.ndarray) -> np.ndarray:
        """The values pydicom's ``pixel_array`` gives, written into ``out`` (C-contiguous, this shape and dtype),
        which is returned. VolumeError when the file is shorter than it was when its header was read."""
        if out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"need a C-contiguous {self.shape} {self.dtype} buffer")
        view = memoryview(out).cast("B")
        if isinstance(self.source, Path):
            try:
                with open(self.source, "rb") as f:
                    f.seek(self.offset)
                    got = f.readinto(view)
            except OSError as exc:
                raise VolumeError(f"a slice file became unreadable ({exc.strerror or type(exc).__name__})") from None
            if got != len(view):
                raise VolumeError("a slice file is shorter than when its header was read (changed while loading?)")
        else:
            view[:] = memoryview(self.source)[self.offset : self.offset + len(view)]  # no intermediate copy
        return _stored_bits(out, bits_stored=self.bits_stored)

    def read(self) -> np.ndarray:
        """The stored values in a new ``[rows, cols]`` array."""
        return self.read_into(np.empty(self.shape, self.dtype))


class NativeHeader(dict):
    """The load tags of one file by keyword (``ds.Rows``, ``ds.get("RescaleSlope")``, ``"X" in ds``), with the
    values pydicom would give: numbers for US/SS/IS/DS (lists when multi-valued), text for the rest."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


HEAD_BYTES = 1 << 14  # read first; real headers are a few kB (7.6 kB on the Philips series); longer: the whole file
# (group, element) -> (keyword, how to read the value) for the tags the assembly reads
_WANTED = {
    (0x0008, 0x0018): ("SOPInstanceUID", "text"),
    (0x0020, 0x0032): ("ImagePositionPatient", "decimals"),
    (0x0020, 0x0037): ("ImageOrientationPatient", "decimals"),
    (0x0028, 0x0002): ("SamplesPerPixel", "US"),
    (0x0028, 0x0004): ("PhotometricInterpretation", "text"),
    (0x0028, 0x0008): ("NumberOfFrames", "integer"),
    (0x0028, 0x0010): ("Rows", "US"),
    (0x0028, 0x0011): ("Columns", "US"),
    (0x0028, 0x0030): ("PixelSpacing", "decimals"),
    (0x0028, 0x0100): ("BitsAllocated", "US"),
    (0x0028, 0x0101): ("BitsStored", "US"),
    (0x0028, 0x0103): ("PixelRepresentation", "US"),
    (0x0028, 0x0120): ("PixelPaddingValue", "US or SS"),
    (0x0028, 0x0121): ("PixelPaddingRangeLimit", "US or SS"),
    (0x0028, 0x1052): ("RescaleIntercept", "decimal"),
    (0x0028, 0x1053): ("RescaleSlope", "decimal"),
    (0x5200, 0x9229): ("SharedFunctionalGroupsSequence", "present"),
    (0x5200, 0x9230): ("PerFrameFunctionalGroupsSequence", "present"),
}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD)


def parse_header(buf: bytes) -> tuple[NativeHeader, int, int] | None:
    """``(load tags, offset of the pixel values, their byte length)`` from the start of a DICOM Part 10 file in
    ``buf``, or None for anything this reader does not take (another transfer syntax, no pixel data within
    ``buf``, a malformed element). Only the tags of :data:`_WANTED` are decoded; every other element is stepped
    over by its length (sequences of undefined length item by item)."""
    if len(buf) < 144 or buf[128:132] != b"DICM":
        return None
    try:
        meta_end, syntax = _file_meta(buf)
        explicit = NATIVE_SYNTAXES.get(syntax)
        if explicit is None:
            return None
        found: dict = {}
        pixel = _walk(buf, meta_end, len(buf), explicit=explicit, found=found)
        if pixel is None:
            return None
        return _decoded(found), pixel[0], pixel[1]
    except (IndexError, ValueError, UnicodeDecodeError, RecursionError, struct.error):
        return None  # a value this walker does not read as pydicom would: pydicom reads the file


def _file_meta(buf: bytes) -> tuple[int, str]:
    """End of the file meta group (always explicit VR little endian) and its transfer syntax UID."""
    at, syntax = 132, ""
    while at + 8 <= len(buf):
        group, element, _, length, value_at = _element_at(buf, at, explicit=True)
        if group != 0x0002:
            return at, syntax
        if element == 0x0010:
            syntax = buf[value_at : value_at + length].rstrip(b"\0 ").decode("ascii")
        at = value_at + length
    raise ValueError("no dataset after the file meta group")


_SHORT_HEAD = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length (explicit VR)
_IMPLICIT_HEAD = struct.Struct("<HHI")  # group, element, 32-bit length (implicit VR, items and delimiters)
_U32 = struct.Struct("<I")


def _element_at(buf, at: int, *, explicit: bool) -> tuple[int, int, bytes, int, int]:
    """``(group, element, VR, value length, value offset)`` of the element starting at ``at`` (VR ``SQ`` for every
    element of an implicit VR file, whose sequences are only told by their undefined length). struct.error when the
    buffer ends inside the element's header."""
    if explicit:
        group, element, vr, length = _SHORT_HEAD.unpack_from(buf, at)
        if group != 0xFFFE:
            if vr in _LONG_VRS:
                return group, element, vr, _U32.unpack_from(buf, at + 8)[0], at + 12
            return group, element, vr, length, at + 8
    group, element, length = _IMPLICIT_HEAD.unpack_from(buf, at)
    return group, element, b"SQ" if group != 0xFFFE else b"", length, at + 8


def _walk(buf, at: int, end: int, *, explicit: bool, found: dict) -> tuple[int, int] | None:
    """Step over the top-level elements from ``at``, collecting the wanted tags; ``(offset, length)`` of the pixel
    data when it is reached within ``buf``, else None. (The explicit VR case, every real file here, unpacks each
    element's header inline: this loop is most of a native read's own time.)"""
    short_head, u32, long_vrs, wanted = _SHORT_HEAD.unpack_from, _U32.unpack_from, _LONG_VRS, _WANTED
    while at + 8 <= end:
        if explicit:
            group, element, vr, length = short_head(buf, at)
            if group == 0xFFFE:
                group, element, vr, length, value_at = _element_at(buf, at, explicit=True)
            elif vr in long_vrs:
                length, value_at = u32(buf, at + 8)[0], at + 12
            else:
                value_at = at + 8
        else:
            group, element, vr, length, value_at = _element_at(buf, at, explicit=False)
        if group == 0x7FE0 and element == 0x0010:
            return (value_at, length) if length != _UNDEFINED else None
        if length == _UNDEFINED:
            if explicit and vr != b"SQ":
                raise ValueError("an undefined length outside a sequence")  # UN in implicit VR: pydicom reads it
            at = _skip_sequence(buf, value_at, explicit=explicit)
            if (group, element) in wanted:
                found[(group, element)] = (b"SQ", b"")
            continue
        if value_at + length > end:
            return None  # the element runs past what was read: the caller reads more
        if (group, element) in wanted:
            found[(group, element)] = (vr, buf[value_at : value_at + length])
        at = value_at + length
    return None


def _skip_sequence(buf, at: int, *, explicit: bool) -> int:
    """The offset after a sequence of undefined length whose items start at ``at``."""
    while True:
        group = int.from_bytes(buf[at : at + 2], "little")
        element = int.from_bytes(buf[at + 2 : at + 4], "little")
        length = int.from_bytes(buf[at + 4 : at + 8], "little")
        at += 8
        if (group, element) == _SEQUENCE_END:
            return at
        if (group, element) != _ITEM:
            raise ValueError("not an item inside a sequence")
        if length != _UNDEFINED:
            at += length
            continue
        while True:  # an item of undefined length: elements up to its delimiter
            g = int.from_bytes(buf[at : at + 2], "little")
            e = int.from_bytes(buf[at + 2 : at + 4], "little")
            if (g, e) == _ITEM_END:
                at += 8
                break
            at = _skip_element(buf, at, explicit=explicit)


def _skip_element(buf, at: int, *, explicit: bool) -> int:
    _, _, vr, length, value_at = _element_at(buf, at, explicit=explicit)
    if length == _UNDEFINED:
        if explicit and vr != b"SQ":
            raise ValueError("an undefined length outside a sequence")
        return _skip_sequence(buf, value_at, explicit=explicit)
    if value_at + length > len(buf):
        raise IndexError("an element runs past the buffer")
    return value_at + length


def _decoded(found: dict) -> NativeHeader:
    """The wanted tags' raw values as pydicom would give them; ValueError for any value that is not exactly what
    the assembly expects (a count of numbers, an integer string), so that pydicom reads that file instead."""
    header = NativeHeader()
    representation = None
    raw_rep = found.get((0x0028, 0x0103))
    if raw_rep is not None and len(raw_rep[1]) >= 2:
        representation = int.from_bytes(raw_rep[1][:2], "little")
    for key, (vr, raw) in found.items():
        keyword, how = _WANTED[key]
        if how == "present":
            header[keyword] = True
        elif how == "text":
            header[keyword] = raw.rstrip(b"\0 ").decode("ascii").strip()
        elif how in ("US", "US or SS"):
            if len(raw) == 0:
                continue
            if len(raw) != 2:
                raise ValueError(f"{keyword}: {len(raw)} bytes")
            signed = how == "US or SS" and (vr == b"SS" or (vr not in (b"US", b"SS") and representation == 1))
            header[keyword] = int.from_bytes(raw, "little", signed=signed)
        elif how == "integer":
            text = raw.decode("ascii").strip(" \0")
            if text:
                header[keyword] = int(text)  # "1.0" raises: pydicom's own reading decides then
        else:  # decimal strings: as many as the tag holds
            parts = [p.strip(" \0") for p in raw.decode("ascii").split("\\")]
            if not any(parts):
                continue
            values = [float(p) for p in parts]
            if len(values) != _COUNTS[keyword]:
                raise ValueError(f"{keyword}: {len(values)} values")
            header[keyword] = values[0] if how == "decimal" else values
    return header


_COUNTS = {
    "ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2, "RescaleSlope": 1,
    "RescaleIntercept": 1,
}  # fmt: skip


def _plain_16_bit_slice(ds: NativeHeader) -> bool:
    try:
        return (
            int(ds.get("NumberOfFrames", 1) or 1) == 1
            and "PerFrameFunctionalGroupsSequence" not in ds
            and "SharedFunctionalGroupsSequence" not in ds
            and int(ds.get("SamplesPerPixel", 1) or 1) == 1
            and int(ds.BitsAllocated) == 16
            and 1 <= int(ds.BitsStored) <= 16
            and int(ds.PixelRepresentation) in (0, 1)
            and int(ds.Rows) > 0
            and int(ds.Columns) > 0
        )
    except (AttributeError, TypeError, ValueError):
        return False


def _stored_bits(pixels: np.ndarray, *, bits_stored: int) -> np.ndarray:
    """The values pydicom's ``pixel_array`` gives for 16-bit words (int16: signed) of which ``bits_stored`` hold the
    value: bits above the stored ones dropped (unsigned), or replaced by the sign of the top stored bit (signed)."""
    stored = bits_stored
    if stored == 16:
        return pixels
    if pixels.dtype.kind == "i":
        shift = np.int16(16 - stored)
        np.left_shift(pixels, shift, out=pixels)
        np.right_shift(pixels, shift, out=pixels)  # arithmetic: the sign bit spreads
    else:
        np.bitwise_and(pixels, np.uint16((1 << stored) - 1), out=pixels)
    return pixels
