"""Write a synthetic head-CT archive: NIfTI volumes plus a ``labels.csv``.

:func:`generate_archive` draws patients one after another (each with a random subtype combination and
1-3 scans), images each patient with several independently sampled protocols and writes
``<scan_id>.nii.gz`` files. Patient ``p`` and its scan ``s`` use generators seeded with ``(seed, p)`` and
``(seed, p, s)``, so the archive is deterministic for a given ``(n, seed, config)`` and an archive of
``n`` scans is a prefix of a larger one with the same seed.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from .lesions import SUBTYPES
from .patient import choose_subtypes, make_patient
from .protocol import ScanProtocol, SynthConfig, sample_protocol, synth_scan

__all__ = ["LABEL_COLUMNS", "ScanRecord", "generate_archive", "read_labels", "save_nifti", "write_labels"]

logger = logging.getLogger(__name__)

LABEL_COLUMNS: tuple[str, ...] = (
    "scan_id",
    "patient_id",
    *SUBTYPES,
    "manufacturer",
    "pixel_spacing_mm",
    "slice_thickness_mm",
    "n_slices",
    "noise_hu",
    "rotation_deg",
    "storage",
    "file",
)


@dataclass(frozen=True)
class ScanRecord:
    """One row of ``labels.csv`` (fields in column order) plus the full protocol."""

    scan_id: str
    patient_id: str
    EDH: int
    SDH: int
    IPH: int
    IVH: int
    SAH: int
    manufacturer: str
    pixel_spacing_mm: float
    slice_thickness_mm: float
    n_slices: int
    noise_hu: float
    rotation_deg: float  # largest absolute rotation angle
    storage: str
    file: str  # file name relative to the archive directory
    protocol: ScanProtocol

    def row(self) -> dict[str, str]:
        """The CSV row as strings (fixed formatting, so that files are byte-identical across runs)."""
        values = {name: getattr(self, name) for name in LABEL_COLUMNS}
        return {k: (f"{v:g}" if isinstance(v, float) else str(v)) for k, v in values.items()}

    @property
    def subtypes(self) -> frozenset[str]:
        return frozenset(k for k in SUBTYPES if getattr(self, k))


def save_nifti(path: Path, *, hu: np.ndarray, affine: np.ndarray) -> None:
    """Write an int16 ``[i, j, k]`` volume with ``affine`` as qform and sform (code 1, mm units)."""
    image = nib.Nifti1Image(hu.astype(np.int16, copy=False), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def generate_archive(
    out_dir: Path,
    *,
    n: int,
    seed: int,
    config: SynthConfig = SynthConfig(),
    progress: Callable[[int], None] | None = None,
) -> list[ScanRecord]:
    """Write ``n`` scans (not patients) as ``out_dir/<scan_id>.nii.gz`` and ``out_dir/labels.csv``.

    Deterministic for a given ``(n, seed, config)``: same ``labels.csv`` bytes and same voxel arrays.
    ``progress`` is called after each scan with the number of scans written so far (1..n).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lo, hi = config.scans_per_patient
    if not 1 <= lo <= hi:
        raise ValueError(f"scans_per_patient must satisfy 1 <= low <= high, got {config.scans_per_patient}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[ScanRecord] = []
    patient_index = 0
    while len(records) < n:
        patient_index += 1
        patient_id = f"synth-p{patient_index:04d}"
        prng = np.random.default_rng([seed, patient_index])
        subtypes = choose_subtypes(rng=prng, normal_fraction=config.normal_fraction)
        n_scans = int(prng.integers(lo, hi + 1))
        patient = make_patient(patient_id=patient_id, subtypes=subtypes, rng=prng)
        for scan_index in range(1, n_scans + 1):
            if len(records) == n:
                break
            srng = np.random.default_rng([seed, patient_index, scan_index])
            protocol = sample_protocol(rng=srng, config=config)
            hu, affine = synth_scan(patient=patient, protocol=protocol, rng=srng)
            scan_id = f"{patient_id}-s{scan_index}"
            file = f"{scan_id}.nii.gz"
            save_nifti(out_dir / file, hu=hu, affine=affine)
            record = _record(
                scan_id=scan_id,
                patient_id=patient_id,
                subtypes=subtypes,
                protocol=protocol,
                file=file,
            )
            records.append(record)
            logger.debug("wrote %s (%s)", file, ",".join(sorted(subtypes)) or "normal")
            if progress is not None:
                progress(len(records))
    write_labels(out_dir / "labels.csv", records=records)
    logger.info("wrote %d synthetic scans of %d patients to %s", len(records), patient_index, out_dir)
    return records


def _record(
    *, scan_id: str, patient_id: str, subtypes: frozenset[str], protocol: ScanProtocol, file: str
) -> ScanRecord:
    flags = {k: int(k in subtypes) for k in SUBTYPES}
    return ScanRecord(
        scan_id=scan_id,
        patient_id=patient_id,
        **flags,
        manufacturer=protocol.manufacturer,
        pixel_spacing_mm=protocol.pixel_spacing_mm,
        slice_thickness_mm=protocol.slice_thickness_mm,
        n_slices=protocol.n_slices,
        noise_hu=protocol.noise_hu,
        rotation_deg=protocol.max_rotation_deg,
        storage=protocol.storage,
        file=file,
        protocol=protocol,
    )


def write_labels(path: Path, *, records: list[ScanRecord]) -> None:
    """Write ``labels.csv`` with :data:`LABEL_COLUMNS` (``\\n`` line endings)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow(record.row())


def read_labels(path: Path) -> list[dict[str, str]]:
    """Rows of a ``labels.csv`` as dictionaries of strings, in file order."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
