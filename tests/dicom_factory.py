"""Write real DICOM CT series with pydicom for tests: a small head phantom, any geometry, any defect."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# identifiers planted in test series: values that cannot turn up by chance (in digits of a number, a hash or
# compressed bytes), so that finding one anywhere means it leaked
PHI = {
    "PatientName": "ZEBULON^QUARTZ^Q",
    "PatientID": "MRN99887766",
    "AccessionNumber": "ACCXQ5544332211",
    "PatientBirthDate": "18770412",
}


def head_slices(*, n: int, rows: int = 48, cols: int = 48, spacing: float = 4.0, thickness: float = 5.0, seed=0):
    """HU slices [n, rows, cols] of an ellipsoid head with skull, brain and a bleed (int16)."""
    rng = np.random.default_rng(seed)
    z = (np.arange(n) - (n - 1) / 2) * thickness
    y = (np.arange(rows) - (rows - 1) / 2) * spacing
    x = (np.arange(cols) - (cols - 1) / 2) * spacing
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    r = np.sqrt((xx / 70) ** 2 + (yy / 85) ** 2 + (zz / 75) ** 2)
    hu = np.full(r.shape, -1000.0)
    hu[r < 1.0] = 1200.0
    hu[r < 0.9] = 35.0
    hu[(xx - 20) ** 2 + yy**2 + zz**2 < 15**2] = 70.0
    hu += rng.normal(0, 3, hu.shape)
    return np.round(hu).astype(np.int16)


@dataclass
class SeriesSpec:
    n: int = 16
    rows: int = 48
    cols: int = 48
    spacing: float = 4.0  # in-plane mm
    step: float = 5.0  # slice spacing mm
    thickness: float = 5.0
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0)
    origin: Sequence[float] = (-94.0, -94.0, -40.0)
    tilt_deg: float = 0.0  # gantry tilt: positions step along the column direction too
    modality: str = "CT"
    sop_class: str = CTImageStorage
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    slope: float = 1.0
    intercept: float = -1024.0
    kvp: float = 120.0
    manufacturer: str = "SYNTH"
    kernel: str = "Hr38"
    series_uid: str = field(default_factory=generate_uid)
    study_uid: str = field(default_factory=generate_uid)
    patient: dict = field(default_factory=lambda: dict(PHI))
    series_description: str = "HEAD NC"
    body_part: str | None = None  # BodyPartExamined, when set
    seed: int = 0
    slice_offsets: Sequence[float] | None = None  # mm along the normal per slice (zones, overlaps); None: k * step

    def normal(self) -> np.ndarray:
        o = np.array(self.orientation, float)
        return np.cross(o[:3], o[3:])

    def offsets(self) -> np.ndarray:
        """Each slice's distance from ``origin`` along the normal, mm ``[n]``."""
        if self.slice_offsets is None:
            return np.arange(self.n) * self.step
        offsets = np.asarray(self.slice_offsets, float)
        if offsets.shape != (self.n,):
            raise ValueError(f"{len(offsets)} slice offsets for n={self.n} slices")
        return offsets

    def positions(self) -> np.ndarray:
        o = np.array(self.orientation, float)
        col_dir = o[3:]
        if self.slice_offsets is not None:  # tilt: each mm along the normal steps tan(tilt) mm down the columns
            slope = np.tan(np.radians(self.tilt_deg))
            return np.array([np.array(self.origin) + d * (self.normal() + slope * col_dir) for d in self.offsets()])
        tilt = np.tan(np.radians(self.tilt_deg)) * self.step
        return np.array(
            [np.array(self.origin) + k * self.step * self.normal() + k * tilt * col_dir for k in range(self.n)]
        )

    def pixel_positions(self) -> np.ndarray:
        """True LPS position of every pixel, ``[n, rows, cols, 3]`` mm: IPP + column * spacing * row direction
        + row * spacing * column direction (the DICOM convention)."""
        o = np.array(self.orientation, float)
        rows = np.arange(self.rows)[:, None, None] * self.spacing * o[3:]
        cols = np.arange(self.cols)[None, :, None] * self.spacing * o[:3]
        return self.positions()[:, None, None, :] + (rows + cols)[None]


def zone_offsets(*, zones: Sequence[tuple[float, int]], boundary: float | None = None) -> np.ndarray:
    """Slice offsets along the normal for a sequential protocol of ``zones`` given as (spacing mm, slices), in
    order. ``boundary`` is the step from each zone's last slice to the next zone's first (default: the next
    zone's spacing); smaller than both spacings is an overlapping slice, negative interleaves the zones."""
    offsets: list[float] = []
    for spacing, count in zones:
        start = 0.0 if not offsets else offsets[-1] + (spacing if boundary is None else boundary)
        offsets.extend(start + np.arange(count) * spacing)
    return np.asarray(offsets)


def head_at(points: np.ndarray, *, centre=(0.0, 0.0, 0.0), noise_sd: float = 0.0, seed: int = 0) -> np.ndarray:
    """HU of a head fixed in patient space at LPS ``points [..., 3]`` mm: the ellipsoid of head_slices (skull,
    brain, a bleed) centred on ``centre``, so any slice geometry images the same object."""
    x, y, z = np.moveaxis(np.asarray(points, float) - np.asarray(centre, float), -1, 0)
    r = np.sqrt((x / 70) ** 2 + (y / 85) ** 2 + (z / 75) ** 2)
    hu = np.full(r.shape, -1000.0)
    hu[r < 1.0] = 1200.0
    hu[r < 0.9] = 35.0
    hu[(x - 20) ** 2 + y**2 + z**2 < 15**2] = 70.0
    if noise_sd:
        hu += np.random.default_rng(seed).normal(0, noise_sd, hu.shape)
    return np.round(hu).astype(np.int16)


def make_dataset(spec: SeriesSpec, *, k: int, pixels_hu: np.ndarray, instance: int | None = None) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = spec.sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = spec.series_uid
    ds.StudyInstanceUID = spec.study_uid
    for key, value in spec.patient.items():
        setattr(ds, key, value)
    ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.ConvolutionKernel = spec.kernel
    ds.SeriesDescription = spec.series_description
    if spec.body_part is not None:
        ds.BodyPartExamined = spec.body_part
    ds.ImageType = list(spec.image_type)
    ds.KVP = spec.kvp
    ds.SliceThickness = spec.thickness
    ds.InstanceNumber = instance if instance is not None else k + 1
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [float(v) for v in spec.orientation]
    ds.ImagePositionPatient = [float(v) for v in spec.positions()[k]]
    ds.PixelSpacing = [spec.spacing, spec.spacing]
    ds.Rows, ds.Columns = pixels_hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if spec.slope is not None:
        ds.RescaleSlope = spec.slope
        ds.RescaleIntercept = spec.intercept
        stored = np.round((pixels_hu.astype(np.float64) - spec.intercept) / spec.slope).astype(np.int16)
    else:
        stored = pixels_hu.astype(np.int16)
    ds.PixelData = stored.tobytes()
    return ds


def write_series(folder: Path, spec: SeriesSpec, *, hu: np.ndarray | None = None, names=None) -> list[Path]:
    """Write one file per slice into ``folder``; returns the paths (named IM0001.dcm ... unless ``names``)."""
    folder.mkdir(parents=True, exist_ok=True)
    hu = (
        hu
        if hu is not None
        else head_slices(
            n=spec.n, rows=spec.rows, cols=spec.cols, spacing=spec.spacing, thickness=spec.step, seed=spec.seed
        )
    )
    paths = []
    for k in range(spec.n):
        ds = make_dataset(spec, k=k, pixels_hu=hu[k])
        name = names[k] if names else f"IM{k + 1:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def expected_affine(spec: SeriesSpec) -> np.ndarray:
    """RAS affine for voxel (column, row, slice) of a series written by write_series (no tilt)."""
    o = np.array(spec.orientation, float)
    a = np.eye(4)
    a[:3, 0] = o[:3] * spec.spacing
    a[:3, 1] = o[3:] * spec.spacing
    a[:3, 2] = spec.normal() * spec.step
    a[:3, 3] = spec.origin
    return np.diag([-1.0, -1, 1, 1]) @ a


__all__ = [
    "PHI",
    "SeriesSpec",
    "expected_affine",
    "head_at",
    "head_slices",
    "make_dataset",
    "pydicom",
    "replace",
    "write_series",
    "zone_offsets",
]
