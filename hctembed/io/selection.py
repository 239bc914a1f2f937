"""Head-CT series selection (FM-HCT Methods, 'Dataset for pretraining'): each threshold is a field."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SelectionConfig:
    """Which series count as non-contrast head CT. Ranges are inclusive."""

    modality: str = "CT"
    allow_contrast: bool = False
    slice_thickness_mm: tuple[float, float] = (0.5, 5.0)
    kvp: tuple[float, float] = (70.0, 150.0)
    min_slices: int = 10
    kernel_pattern: str | None = None  # e.g. r"^(Hr|Qr|J)(3[5-9]|4[0-5])" for the paper's kernels
    description_pattern: str | None = None  # matched case-insensitively against SeriesDescription
    max_spacing_ratio: float = 3.0  # coarsest / finest zone spacing (boundary gaps excluded); irregular: max / min gap
    max_gap_factor: float = 1.5  # a gap this many times the usual spacing is a missing slice
    allow_non_head: bool = False  # keep series whose header or image says another body region


# reason codes (stable strings: they land in the manifest and the status table)
NOT_CT = "not_ct"
CONTRAST = "contrast"
THICKNESS = "slice_thickness"
KVP = "kvp"
TOO_FEW_SLICES = "too_few_slices"
KERNEL = "kernel_filter"
DESCRIPTION = "description_filter"
LOCALIZER_ONLY = "localizer_only"
DERIVED_ONLY = "derived_only"
SECONDARY_CAPTURE = "secondary_capture"
STRUCTURED_REPORT = "structured_report"
NO_GEOMETRY = "no_geometry"
NOT_HEAD = "not_head"  # see hctembed.head_check


def check_series(
    *,
    modality: str,
    contrast: bool,
    slice_thickness: float | None,
    kvp: float | None,
    n_slices: int,
    kernel: str,
    description: str,
    config: SelectionConfig,
    body_part: str = "",
    study_description: str = "",
    fov_mm: float | None = None,
) -> tuple[str, str] | None:
    """``(reason_code, message)`` when the series is not selected, else None. Messages are PHI-free (they name
    header fields, never quote a description)."""
    if modality.upper() != config.modality.upper():
        return NOT_CT, f"modality {modality or 'missing'}, not {config.modality}"
    if contrast and not config.allow_contrast:
        return CONTRAST, "contrast agent recorded (ContrastBolusAgent)"
    lo, hi = config.slice_thickness_mm
    if slice_thickness is not None and not lo <= slice_thickness <= hi:
        return THICKNESS, f"slice thickness {slice_thickness:g} mm outside {lo:g}-{hi:g} mm"
    lo, hi = config.kvp
    if kvp is not None and not lo <= kvp <= hi:
        return KVP, f"kVp {kvp:g} outside {lo:g}-{hi:g}"
    if n_slices < config.min_slices:
        return TOO_FEW_SLICES, f"{n_slices} slices (< {config.min_slices})"
    if config.kernel_pattern and not re.search(config.kernel_pattern, kernel or ""):
        return KERNEL, f"kernel {kernel or 'missing'} does not match {config.kernel_pattern}"
    if config.description_pattern and not re.search(config.description_pattern, description or "", re.IGNORECASE):
        return DESCRIPTION, "series description does not match the filter"
    if not config.allow_non_head:
        from hctembed.head_check import header_region

        region, why = header_region(body_part=body_part, descriptions=(description, study_description), fov_mm=fov_mm)
        if region == NOT_HEAD:
            return NOT_HEAD, f"not a head CT: {why} (--allow-non-head keeps it)"
    return None
