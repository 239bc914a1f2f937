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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import nibabel as nib
import numpy as np

from hctembed.errors import InputError

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
    workers: int = 1,
) -> list[ScanRecord]:
    """Write ``n`` scans (not patients) as ``out_dir/<scan_id>.nii.gz`` and ``out_dir/labels.csv``.

    Deterministic for a given ``(n, seed, config)``: same ``labels.csv`` bytes and same voxel arrays,
    whatever ``workers`` (patients are rendered in that many processes; each patient draws only from
    generators seeded by ``(seed, patient)`` and ``(seed, patient, scan)``).
    ``progress`` is called after each scan with the number of scans written so far (1..n).
    """
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    lo, hi = config.scans_per_patient
    if not 1 <= lo <= hi:
        raise InputError(f"scans_per_patient must satisfy 1 <= low <= high, got {config.scans_per_patient}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan_patients(n=n, seed=seed, config=config)
    jobs = [(out_dir, seed, config, index, count) for index, count in plan]
    records: list[ScanRecord] = []
    if workers == 1 or len(jobs) < 2:
        results = map(_write_patient, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=get_context("spawn"))
        results = pool.map(_write_patient, jobs, chunksize=1)
    try:
        for patient_records in results:
            for record in patient_records:
                records.append(record)
                if progress is not None:
                    progress(len(records))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    write_labels(out_dir / "labels.csv", records=records)
    logger.debug("wrote %d synthetic scans of %d patients to %s", len(records), len(plan), out_dir)
    return records


def _patient_draws(*, seed: int, index: int, config: SynthConfig) -> tuple[np.random.Generator, frozenset[str], int]:
    """The generator of patient ``index``, its subtypes and its scan count (drawn in this order)."""
    prng = np.random.default_rng([seed, index])
    subtypes = choose_subtypes(rng=prng, normal_fraction=config.normal_fraction)
    lo, hi = config.scans_per_patient
    return prng, subtypes, int(prng.integers(lo, hi + 1))


def _plan_patients(*, n: int, seed: int, config: SynthConfig) -> list[tuple[int, int]]:
    """(patient index, scans to write) until ``n`` scans are planned; the last patient may be cut short."""
    plan, total, index = [], 0, 0
    while total < n:
        index += 1
        _, _, count = _patient_draws(seed=seed, index=index, config=config)
        count = min(count, n - total)
        plan.append((index, count))
        total += count
    return plan


def _write_patient(job: tuple[Path, int, SynthConfig, int, int]) -> list[ScanRecord]:
    """Render and write the first ``count`` scans of patient ``index``; returns their records."""
    out_dir, seed, config, index, count = job
    prng, subtypes, _ = _patient_draws(seed=seed, index=index, config=config)
    patient_id = f"synth-p{index:04d}"
    patient = make_patient(patient_id=patient_id, subtypes=subtypes, rng=prng, lesion_scale=config.lesion_scale)
    records = []
    for scan_index in range(1, count + 1):
        srng = np.random.default_rng([seed, index, scan_index])
        protocol = sample_protocol(rng=srng, config=config)
        hu, affine = synth_scan(patient=patient, protocol=protocol, rng=srng)
        scan_id = f"{patient_id}-s{scan_index}"
        file = f"{scan_id}.nii.gz"
        save_nifti(out_dir / file, hu=hu, affine=affine)
        records.append(_record(scan_id=scan_id, patient_id=patient_id, subtypes=subtypes, protocol=protocol, file=file))
        logger.debug("wrote %s (%s)", file, ",".join(sorted(subtypes)) or "normal")
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
