"""Series on a DICOMweb server (:mod:`hctembed.io.dicomweb`): QIDO filters, instance metadata read into the same
header facts as a file's header, the listing of one pass, change digests, and a series' files fetched by SOP UID."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pydicom

from hctembed.errors import InputError
from hctembed.io.dicom_headers import HeaderError, SliceHeader, header_of
from hctembed.io.dicomweb import SERIES_KEYS, DicomWebClient, SeriesGone

log = logging.getLogger(__name__)


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


# the attributes a series' selection reads (hctembed.io.dicom_headers.header_of), as DICOM JSON keys: a real
# scanner's instance carries hundreds more, and pydicom's from_json costs ~20 us an element
HEADER_KEYWORDS = (
    "AcquisitionNumber", "BodyPartExamined", "Columns", "ContrastBolusAgent", "ConvolutionKernel",
    "ImageOrientationPatient", "ImagePositionPatient", "ImageType", "InstanceNumber", "KVP", "Manufacturer",
    "Modality", "NumberOfFrames", "PatientID", "PixelSpacing", "ReconstructionDiameter", "Rows", "SOPClassUID",
    "SOPInstanceUID", "SeriesDescription", "SeriesInstanceUID", "SharedFunctionalGroupsSequence", "SliceThickness",
    "StudyDescription", "StudyInstanceUID", "TransferSyntaxUID",
    "PlaneOrientationSequence", "PixelMeasuresSequence",  # inside SharedFunctionalGroupsSequence (enhanced CT)
)  # fmt: skip
HEADER_KEYS = frozenset(f"{pydicom.datadict.tag_for_keyword(k):08X}" for k in HEADER_KEYWORDS)


def dataset_of(metadata: dict) -> pydicom.Dataset:
    """The attributes a series' selection reads (:data:`HEADER_KEYWORDS`) of one instance's DICOM JSON metadata, as
    a pydicom Dataset (the transfer syntax, when the server sends the file meta group, in ``file_meta``). Built
    element by element (pydicom's ``from_json`` inspects a handler's signature per element: ~80 us each)."""
    ds = pydicom.Dataset()
    try:
        for key, item in metadata.items():
            if key not in HEADER_KEYS or not isinstance(item, dict):
                continue
            vr, values = item.get("vr"), item.get("Value")
            if not isinstance(vr, str) or not isinstance(values, list) or not values:
                continue
            if vr == "SQ":
                value = [dataset_of(v) for v in values]
            elif vr == "PN":
                value = [v.get("Alphabetic", "") if isinstance(v, dict) else str(v) for v in values]
            else:
                value = values
            if key == "00020010":
                ds.file_meta = pydicom.dataset.FileMetaDataset()
                ds.file_meta.TransferSyntaxUID = str(value[0])
                continue
            ds.add_new(int(key, 16), vr, value if vr == "SQ" or len(value) > 1 else value[0])
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        raise HeaderError(f"unreadable DICOM JSON metadata ({type(exc).__name__})") from None
    return ds


def split_filters(filters: Sequence[str], *, since: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """``KEY=VALUE`` filters as (study query, series query) parameters; ``since`` adds ``StudyDate=SINCE-``."""
    study, series = {}, {}
    for text in filters:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").isalnum():
            raise InputError(f"--filter {text!r}: expected KEY=VALUE (e.g. Modality=CT, StudyDate=20240101-)")
        (series if key in SERIES_KEYS else study)[key] = value.strip()
    if since is not None:
        digits = since.replace("-", "")
        if not (len(digits) == 8 and digits.isdigit()):
            raise InputError(f"--since {since!r}: expected a date as YYYY-MM-DD or YYYYMMDD")
        study["StudyDate"] = f"{digits}-"
    return study, series


@dataclass
class Listing:
    """What one pass over the server found: every instance's header (its ``file`` is ``STUDY/SERIES/SOP``) and the
    series that could not be read."""

    headers: list[SliceHeader] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (STUDY/SERIES, reason)


def list_series(
    client: DicomWebClient,
    *,
    filters: Sequence[str] = (),
    since: str | None = None,
    progress: Callable[[int], None] | None = None,
    cache: dict[str, tuple[int, list[SliceHeader]]] | None = None,
) -> Listing:
    """QIDO every study and series the filters select, and read each series' instance metadata into headers.
    ``cache`` (``STUDY/SERIES`` -> (instance count, headers)) spares the metadata of series whose count has not
    changed since an earlier pass (follow mode)."""
    study_filters, series_filters = split_filters(filters, since=since)
    out = Listing()
    for study in client.studies(study_filters):
        study_uid = _value(study, "0020000D")
        if not study_uid:
            continue
        try:
            found = list(client.series(study_uid, series_filters))
        except SeriesGone:  # a study deleted between the two queries: nothing of it to embed
            log.info("a study left the PACS while it was being listed")
            continue
        for series in found:
            series_uid = _value(series, "0020000E")
            if not series_uid:
                continue
            key = f"{study_uid}/{series_uid}"
            count = _count(_value(series, "00201209"))
            if cache is not None and key in cache and cache[key][0] == count >= 0:
                out.headers.extend(cache[key][1])
                continue
            try:
                headers = [header_of(dataset_of(m), file=f"{key}/{_value(m, '00080018') or i}")
                           for i, m in enumerate(client.metadata(study_uid, series_uid))]  # fmt: skip
            except (SeriesGone, HeaderError) as exc:
                out.unreadable.append((key, str(exc)))
                continue
            if cache is not None:
                cache[key] = (len(headers), headers)
            out.headers.extend(headers)
            if progress:
                progress(len(out.headers))
    return out


def _count(value: str | None) -> int:
    """A QIDO instance count, or -1 when the server gives none (or none that reads as a number)."""
    try:
        return int(value) if value is not None else -1
    except ValueError:
        return -1


def instance_digest(files: Sequence[str]) -> int:
    """A series' instance set as a 63-bit number (the "mtime" that tells a re-run the series changed)."""
    return int.from_bytes(hashlib.sha256("\n".join(sorted(files)).encode()).digest()[:8], "big") >> 1


_SOP_TAG = b"\x08\x00\x18\x00"  # (0008,0018) SOP Instance UID, little endian


def sop_instance_uid(blob: bytes) -> str | None:
    """The SOP Instance UID of one DICOM file's bytes: read straight from its element (the first group 0008 element
    of that tag after the file meta group, explicit or implicit VR little endian), else by pydicom; None when the
    bytes are not DICOM."""
    at = blob.find(_SOP_TAG, 132)
    while 0 <= at < 4096:
        if blob[at + 4 : at + 6] == b"UI":  # explicit VR: 2-byte length
            length, start = int.from_bytes(blob[at + 6 : at + 8], "little"), at + 8
        else:  # implicit VR: 4-byte length
            length, start = int.from_bytes(blob[at + 4 : at + 8], "little"), at + 8
        value = blob[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        if 0 < length <= 64 and value and all(c.isdigit() or c == "." for c in value):
            return value
        at = blob.find(_SOP_TAG, at + 1)
    try:
        ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # not DICOM: the assembly names what is missing
        return None
    return str(ds.get("SOPInstanceUID", "")) or None


def fetch_series_files(client: DicomWebClient, files: Sequence[str]) -> dict[str, bytes]:
    """The stored bytes of the instances ``files`` (``STUDY/SERIES/SOP``) of one series, by ref, from one WADO-RS
    request; SeriesGone when the server no longer has the series or lacks one of them."""
    study_uid, series_uid, _ = files[0].split("/", 2)
    wanted = {f.rsplit("/", 1)[1]: f for f in files}
    found: dict[str, bytes] = {}
    for blob in client.retrieve_series(study_uid, series_uid):
        sop = sop_instance_uid(blob)
        if sop in wanted:
            found[wanted[sop]] = blob
    missing = len(wanted) - len(found)
    if missing:
        raise SeriesGone(f"{missing} of the series' {len(wanted)} instances are not on the PACS any more")
    return found
