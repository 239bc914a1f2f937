"""Read the header facts of one DICOM file (in a folder or inside a zip) without its pixel data.

Raw identifiers (patient id, UIDs, descriptions) stay in memory only: callers turn them into keyed
pseudonyms before anything is logged or stored.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from hctembed.io.admission import ZIP_SEP, ZipFiles, ZipRefused, parse_header_prefix, split_ref

__all__ = ["ZIP_SEP", "HeaderError", "SliceHeader", "header_of", "read_bytes", "read_dataset", "read_header"]

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
STRUCTURED_REPORT_PREFIX = "1.2.840.10008.5.1.4.1.1.88"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"


class HeaderError(ValueError):
    """A file that is not readable DICOM; the message is PHI-free."""


@dataclass(frozen=True)
class SliceHeader:
    """What grouping and selection need from one file. ``file`` is relative to the archive root."""

    file: str
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    sop_class: str
    image_type: tuple[str, ...]
    series_description: str
    manufacturer: str
    body_part: str
    study_description: str
    fov_mm: float | None  # ReconstructionDiameter, else the larger of rows x and columns x pixel spacing
    kernel: str
    contrast: bool
    slice_thickness: float | None
    kvp: float | None
    rows: int
    cols: int
    pixel_spacing: tuple[float, float] | None
    iop: tuple[float, ...] | None
    ipp: tuple[float, float, float] | None
    acquisition_number: int | None
    instance_number: int | None
    transfer_syntax: str
    n_frames: int

    @property
    def is_localizer(self) -> bool:
        return any(t.upper() in {"LOCALIZER", "SCOUT", "TOPOGRAM"} for t in self.image_type)

    @property
    def is_derived(self) -> bool:
        return bool(self.image_type) and self.image_type[0].upper() == "DERIVED"

    @property
    def is_secondary_capture(self) -> bool:
        return self.sop_class.startswith(SECONDARY_CAPTURE_PREFIX)

    @property
    def is_structured_report(self) -> bool:
        return self.sop_class.startswith(STRUCTURED_REPORT_PREFIX) or self.modality.upper() == "SR"


def read_bytes(root: Path, ref: str, *, zips: ZipFiles | None = None) -> bytes:
    """Bytes of a file or zip member named by ``ref`` relative to ``root`` (``zips``: zips already opened)."""
    if zips is not None:
        return zips.read(root, ref)
    with ZipFiles() as own:
        return own.read(root, ref)


def read_dataset(
    root: Path, ref: str, *, pixels: bool, zips: ZipFiles | None = None, member: bytes | None = None
) -> pydicom.Dataset:
    """Parse a DICOM file; raises HeaderError (PHI-free) for anything that is not readable DICOM, and
    ZipRefused for a zip over the admission limits. A zip member's header (``pixels=False``) is parsed from its
    first bytes: only those are inflated. ``zips``: the zips of this walk or series, opened once each;
    ``member``: the zip member's bytes when the caller has inflated them already."""
    own = None if zips is not None else ZipFiles()
    zips = zips or own
    try:
        if member is not None and pixels:  # bytes in memory already (a zip member, a file fetched from a PACS)
            ds = pydicom.dcmread(io.BytesIO(member))
        elif split_ref(ref) is None:
            ds = pydicom.dcmread(str(root / ref), stop_before_pixels=not pixels)
        elif pixels:
            ds = pydicom.dcmread(io.BytesIO(member if member is not None else zips.read(root, ref)))
        else:
            ds = parse_header_prefix(
                lambda n: zips.header_bytes(root, ref, at_least=n),
                parse=lambda f: pydicom.dcmread(f, stop_before_pixels=True),
            )
    except InvalidDicomError:
        raise HeaderError("not a DICOM file (no DICM preamble)") from None
    except ZipRefused:
        raise
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        raise HeaderError(f"unreadable DICOM ({type(exc).__name__})") from None
    finally:
        if own is not None:
            own.close()
    if "SOPInstanceUID" not in ds:
        raise HeaderError("DICOM file without SOPInstanceUID")
    return ds


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _fov(ds: pydicom.Dataset, spacing: tuple[float, ...] | None) -> float | None:
    rows, cols = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if spacing is None or not rows or not cols:
        return None
    return max(rows * spacing[0], cols * spacing[1])


def header_of(ds: pydicom.Dataset, *, file: str) -> SliceHeader:
    """Header facts of a parsed dataset (classic or enhanced multi-frame)."""
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    spacing = _floats(ds.get("PixelSpacing"), 2)
    thickness = _float(ds.get("SliceThickness"))
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:  # enhanced multi-frame keeps geometry in functional groups
        group = shared[0]
        if iop is None and "PlaneOrientationSequence" in group:
            iop = _floats(group.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
        if "PixelMeasuresSequence" in group:
            measures = group.PixelMeasuresSequence[0]
            spacing = spacing or _floats(measures.get("PixelSpacing"), 2)
            thickness = thickness or _float(measures.get("SliceThickness"))
    file_meta = getattr(ds, "file_meta", None)
    syntax = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    return SliceHeader(
        file=file,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        patient_id=str(ds.get("PatientID", "")),
        modality=str(ds.get("Modality", "")),
        sop_class=str(ds.get("SOPClassUID", "")),
        image_type=tuple(str(t) for t in (ds.get("ImageType") or ())),
        series_description=str(ds.get("SeriesDescription", "")),
        manufacturer=str(ds.get("Manufacturer", "")),
        body_part=str(ds.get("BodyPartExamined", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        fov_mm=_float(ds.get("ReconstructionDiameter")) or _fov(ds, spacing),
        kernel=" ".join(str(k) for k in np.atleast_1d(ds.get("ConvolutionKernel", "") or "")),
        contrast=bool(str(ds.get("ContrastBolusAgent", "") or "").strip()),
        slice_thickness=thickness,
        kvp=_float(ds.get("KVP")),
        rows=_int(ds.get("Rows")) or 0,
        cols=_int(ds.get("Columns")) or 0,
        pixel_spacing=spacing,
        iop=iop,
        ipp=ipp,
        acquisition_number=_int(ds.get("AcquisitionNumber")),
        instance_number=_int(ds.get("InstanceNumber")),
        transfer_syntax=syntax,
        n_frames=_int(ds.get("NumberOfFrames")) or 1,
    )


def read_header(root: Path, ref: str, *, zips: ZipFiles | None = None) -> SliceHeader:
    return header_of(read_dataset(root, ref, pixels=False, zips=zips), file=ref)
