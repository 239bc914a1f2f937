"""Group DICOM files into series candidates: by SeriesInstanceUID, then into stacks of one geometry.

A candidate is one stack of slices that could become a volume. Localizers, derived images, secondary
captures and structured reports are set aside with a reason; a UID holding several stacks (other
orientation or matrix, or repeated acquisitions over the same positions) becomes several candidates;
a stray slice with other geometry is dropped from its stack and noted. Selection (head-CT rules) runs
on each candidate. Everything recorded here is PHI-free: identifiers become keyed pseudonyms.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hctembed.head_check import header_region
from hctembed.io import selection as sel
from hctembed.io.dicom_headers import SliceHeader
from hctembed.io.pseudonym import Pseudonymizer
from hctembed.io.selection import SelectionConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesCandidate:
    """One stack of DICOM slices and the decision about it."""

    scan_id: str  # series pseudonym ("se-...")
    patient_id: str  # patient pseudonym ("pt-...")
    study_id: str  # study pseudonym ("st-...")
    files: tuple[str, ...]  # relative to the archive root, sorted by name
    folder: str  # the common folder of the files (relative)
    facts: dict[str, Any] = field(default_factory=dict)
    selected: bool = True
    reason_code: str | None = None
    reason: str | None = None
    flags: tuple[str, ...] = ()


def _patient_key(h: SliceHeader, pseudonyms: Pseudonymizer) -> str:
    """The patient pseudonym; without a PatientID, one per study (never one shared by every anonymous scan)."""
    if h.patient_id.strip():
        return pseudonyms.patient(h.patient_id)
    return pseudonyms.key("pt", f"study-without-patient-id:{h.study_uid}")


def _geometry_key(h: SliceHeader) -> tuple:
    iop = tuple(np.round(h.iop, 3)) if h.iop else None
    spacing = tuple(np.round(h.pixel_spacing, 4)) if h.pixel_spacing else None
    return (iop, h.rows, h.cols, spacing)


def _position_on_normal(h: SliceHeader) -> float | None:
    if h.iop is None or h.ipp is None:
        return None
    normal = np.cross(np.array(h.iop[:3]), np.array(h.iop[3:]))
    return float(np.dot(normal, np.array(h.ipp)))


def _common_folder(files: Sequence[str]) -> str:
    parts = [f.split("/")[:-1] for f in files]
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return "/".join(common)


def _facts(slices: Sequence[SliceHeader]) -> dict[str, Any]:
    first = slices[0]
    counts = Counter(h.slice_thickness for h in slices if h.slice_thickness is not None)
    thickness = counts.most_common(1)[0][0] if counts else None
    return {
        "modality": first.modality,
        "manufacturer": first.manufacturer,
        "slice_thickness_mm": thickness,
        "kvp": first.kvp,
        "kernel": first.kernel,
        "contrast": first.contrast,
        "n_slices": sum(h.n_frames for h in slices),
        "rows": first.rows,
        "cols": first.cols,
        "pixel_spacing_mm": list(first.pixel_spacing) if first.pixel_spacing else None,
        "orientation": [round(v, 4) for v in first.iop] if first.iop else None,
        "transfer_syntax": first.transfer_syntax,
        "multiframe": first.n_frames > 1,
    }


def _split_by_acquisition(stack: list[SliceHeader]) -> list[list[SliceHeader]]:
    """Repeated acquisitions over the same positions (same geometry) become separate stacks."""
    positions = [_position_on_normal(h) for h in stack]
    unique_sops = {h.sop_uid for h in stack}
    rounded = Counter(round(p, 2) for p in positions if p is not None)
    repeated = len(unique_sops) > len(rounded) and any(c > 1 for c in rounded.values())
    acquisitions = {h.acquisition_number for h in stack}
    if repeated and len(acquisitions) > 1:
        by_acq: dict[Any, list[SliceHeader]] = defaultdict(list)
        for h in stack:
            by_acq[h.acquisition_number].append(h)
        return [by_acq[a] for a in sorted(by_acq, key=lambda a: (a is None, a))]
    return [stack]


def group_series(
    headers: Sequence[SliceHeader], *, pseudonyms: Pseudonymizer, config: SelectionConfig
) -> list[SeriesCandidate]:
    """Turn file headers into series candidates with decisions (selected or skipped with a reason)."""
    by_uid: dict[str, list[SliceHeader]] = defaultdict(list)
    for h in headers:
        by_uid[h.series_uid or f"no-uid:{h.file}"].append(h)
    out: list[SeriesCandidate] = []
    for uid, members in sorted(by_uid.items(), key=lambda kv: min(h.file for h in kv[1])):
        out.extend(_candidates_of(uid, members, pseudonyms=pseudonyms, config=config))
    return out


def _candidate(uid, members, *, pseudonyms, decision, part=0, flags=(), facts=None) -> SeriesCandidate:
    """A candidate for ``members``; ``decision`` is None (selected) or ``(reason_code, reason)``."""
    first = members[0]
    files = tuple(sorted(h.file for h in members))
    return SeriesCandidate(
        scan_id=pseudonyms.series(uid, part=part),
        patient_id=_patient_key(first, pseudonyms),
        study_id=pseudonyms.study(first.study_uid),
        files=files,
        folder=_common_folder(files),
        facts=facts if facts is not None else _facts(members),
        selected=decision is None,
        reason_code=None if decision is None else decision[0],
        reason=None if decision is None else decision[1],
        flags=tuple(flags),
    )


def _skip(uid, members, *, pseudonyms, code, reason) -> SeriesCandidate:
    return _candidate(uid, members, pseudonyms=pseudonyms, decision=(code, reason))


def _candidates_of(uid: str, members: list[SliceHeader], *, pseudonyms, config) -> list[SeriesCandidate]:
    # dedupe by SOPInstanceUID (the same file copied twice)
    unique: dict[str, SliceHeader] = {}
    for h in sorted(members, key=lambda h: h.file):
        unique.setdefault(h.sop_uid, h)
    flags: list[str] = []
    if len(unique) < len(members):
        flags.append(f"duplicate_files:{len(members) - len(unique)}")
    slices = list(unique.values())
    if all(h.is_structured_report for h in slices):
        return [_skip(uid, slices, pseudonyms=pseudonyms, code=sel.STRUCTURED_REPORT, reason="structured report")]
    if all(h.is_secondary_capture for h in slices):
        return [_skip(uid, slices, pseudonyms=pseudonyms, code=sel.SECONDARY_CAPTURE, reason="secondary capture")]
    images = [h for h in slices if not (h.is_structured_report or h.is_secondary_capture)]
    localizers = [h for h in images if h.is_localizer]
    images = [h for h in images if not h.is_localizer]
    if localizers:
        flags.append(f"localizers_dropped:{len(localizers)}")
    if not images:
        return [_skip(uid, slices, pseudonyms=pseudonyms, code=sel.LOCALIZER_ONLY, reason="localizer images only")]
    derived = [h for h in images if h.is_derived]
    originals = [h for h in images if not h.is_derived]
    if not originals:
        return [_skip(uid, images, pseudonyms=pseudonyms, code=sel.DERIVED_ONLY, reason="derived images only")]
    if derived:
        flags.append(f"derived_dropped:{len(derived)}")
    missing_geometry = [h for h in originals if h.iop is None or h.ipp is None or h.pixel_spacing is None]
    if missing_geometry and originals[0].n_frames == 1:
        return [
            _skip(
                uid,
                originals,
                pseudonyms=pseudonyms,
                code=sel.NO_GEOMETRY,
                reason=f"{len(missing_geometry)} slices lack position, orientation or pixel spacing",
            )
        ]
    stacks: dict[tuple, list[SliceHeader]] = defaultdict(list)
    for h in originals:
        stacks[_geometry_key(h)].append(h)
    ordered = sorted(stacks.values(), key=len, reverse=True)
    main_size = sum(h.n_frames for h in ordered[0])
    kept: list[list[SliceHeader]] = []
    stray = 0
    for stack in ordered:
        size = sum(h.n_frames for h in stack)
        if stack is not ordered[0] and size < config.min_slices and main_size >= config.min_slices:
            stray += len(stack)
            continue
        kept.extend(_split_by_acquisition(stack))
    if stray:
        flags.append(f"inconsistent_geometry_dropped:{stray}")
    out = []
    for part, stack in enumerate(kept, start=1 if len(kept) > 1 else 0):
        first = stack[0]
        facts = _facts(stack)
        region, _ = header_region(
            body_part=first.body_part, descriptions=(first.series_description, first.study_description)
        )
        if region == "head":  # the header says so: the image test is not needed (an infant's skull may fail it)
            facts["header_region"] = region
        decision = sel.check_series(
            modality=first.modality,
            contrast=first.contrast,
            slice_thickness=facts["slice_thickness_mm"],
            kvp=first.kvp,
            n_slices=facts["n_slices"],
            kernel=first.kernel,
            description=first.series_description,
            config=config,
            body_part=first.body_part,
            study_description=first.study_description,
            fov_mm=first.fov_mm,
        )
        stack_flag = [f"stack:{part}of{len(kept)}"] if len(kept) > 1 else []
        out.append(
            _candidate(
                uid, stack, pseudonyms=pseudonyms, decision=decision, part=part, flags=flags + stack_flag, facts=facts
            )
        )
    return out
