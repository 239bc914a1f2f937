"""Is this a head CT? The image decides; a header can add evidence that it is not.

An archive export mixes head CT with chest, abdominal, pelvic, spine and limb CT, and an encoder pretrained on
heads gives a body scan a vector anyway: it would be searched as a head. Two checks decide ``not_head`` (a
recorded skip reason; ``--allow-non-head`` overrides both):

* **Header** (DICOM, when the archive is scanned, before any pixel is read): BodyPartExamined naming a body
  region other than the head (NECK is not one: a neck CT or a CTA holds the head at one end); else the first
  description naming a region in a whole word, the series' before the study's (within one, a body word beats a
  head word: "CT CHEST" over "AX 3MM cranio-caudal" is a chest, "L-SPINE NEUROFORAMINA" a spine, "AX HEAD 5mm"
  of a "CT HEAD AND C-SPINE" study a head); or a reconstructed field of view wider
  than any head needs (:data:`MAX_HEAD_FOV_MM`). A header that says "head" proves nothing: the image test runs
  on every scan. Descriptions are matched in memory and never stored.
* **Image** (every scan, on the HU volume it is loaded into): axial slices every :data:`SAMPLE_MM` along the
  whole z extent, so a head at one end of a head-and-neck scan or a CT angiogram from the aortic arch is found.
  A slice is a cranial cross-section when it is of head size (:data:`BODY_AREA_CM2`, the patient and the convex
  hull of its bone), its bone forms a ring (:data:`MIN_RING` of the directions from its centre reach bone; a
  missing bone flap leaves most of them), only a scalp lies outside that ring (:data:`MAX_SCALP_MM` mean depth:
  a pelvis, abdomen or knee has centimetres of muscle and fat around its bone), and the ring holds tissue of
  brain density (0-90 HU: brain, blood) with little fat or air; or it is a closed ring (:data:`CLOSED_RING`)
  around air with nothing beyond it (a dry-skull phantom). A head needs :data:`HEAD_SLICES_NEEDED` such slices.
  Judged on a labelled set of synthetic and real volumes (tests/test_head_check.py; BENCHMARKS.md).

Pure numpy/scipy on a few dozen slices at about 2 mm pixels: 5-50 milliseconds per scan.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

NOT_HEAD = "not_head"

HEAD_PARTS = {"HEAD", "BRAIN", "SKULL", "CRANIUM", "CEREBRUM", "HEADNECK", "HEAD_NECK", "HEADANDNECK", "NECK"}
# (a neck CT, or a CTA from the arch to the vertex, holds the head at one end: the image decides)
BODY_PARTS = {
    "CHEST", "THORAX", "LUNG", "HEART", "ABDOMEN", "ABD", "PELVIS", "ABDOMENPELVIS", "CHESTABDOMEN",
    "CHESTABDOMENPELVIS", "CAP", "WHOLEBODY", "BODY", "TRUNK", "LIVER", "KIDNEY", "SPINE", "TSPINE",
    "LSPINE", "SSPINE", "SHOULDER", "ARM", "ELBOW", "WRIST", "HAND", "HIP", "LEG", "KNEE", "ANKLE",
    "FOOT", "EXTREMITY", "BREAST", "COLON", "AORTA",
}  # fmt: skip
# whole words only: "cranio-caudal" names no skull, "NEUROFORAMINA" no brain
_HEAD_WORDS = re.compile(
    r"\b(head|brain|skull|cranial|cranium|cerebral|cerebrum|neuro|stroke|kopf|sch(a|ae|ä)del|t(ê|e)te|cabeza|"
    r"cerveau|craneo)\b",
    re.I,
)
_BODY_WORDS = re.compile(
    r"\b(chest|thorax|thoracic|lungs?|pulmonary|ctpa|cardiac|heart|coronary|abd|abdomen|abdominal|pelvis|pelvic|"
    r"liver|hepatic|renal|kidneys?|colon|spine|spinal|[ctls]-?spine|lumbar|knees?|hips?|shoulders?|extremity|"
    r"extremities|aorta|aortic|runoff|whole.?body|bauch|becken)\b",
    re.I,
)
MAX_HEAD_FOV_MM = 400.0  # heads are reconstructed at 180-300 mm; 400 mm and more is a body field of view
BODY_AREA_CM2 = (40.0, 450.0)  # an adult head's axial cross-section is about 120-260 cm2; an adult trunk 500+
CLOSED_RING = 0.85  # of the directions from the centre reach bone: a closed skull (may hold air: a phantom)
MIN_RING = 0.55  # an open ring (a missing bone flap) is a head only with brain inside; ribs cover less
MIN_BRAIN_FRACTION = 0.6  # of the tissue inside the bone's hull at 0-90 HU
MAX_AIR_FRACTION = 0.10  # inside the hull below -200 HU (lung)
MAX_FAT_FRACTION = 0.15  # inside the hull at -200..-20 HU (abdominal fat)
BONE_HU = 250.0  # bone at about 2 mm pixels: a neonate's 1.5 mm skull averages down to 300-600 HU
MAX_SCALP_MM = 14.0  # mean depth of tissue outside the bone's hull: a scalp is 3-8 mm (ears add a little);
# a chest wall, the abdominal wall or the muscles and fat around a pelvis or a knee are 20-60 mm
MAX_PHANTOM_SCALP_MM = 6.0  # around a closed ring of bone holding air: a dry-skull phantom has none, a chest lots
SAMPLE_MM = 8.0  # axial slices looked at, every this far along z
MAX_SAMPLES = 48
HEAD_SLICES_NEEDED = 3  # cranial cross-sections needed anywhere along z (fewer slices sampled: all of them)


def header_region(
    *, body_part: str = "", descriptions: Sequence[str] = (), fov_mm: float | None = None
) -> tuple[str | None, str]:
    """``("head" | "not_head" | None, reason)`` from header fields; ``None`` when they do not say. The reason
    names the field, never a description's text."""
    part = re.sub(r"[^A-Z]", "", (body_part or "").upper())
    if part in BODY_PARTS:
        return NOT_HEAD, f"BodyPartExamined is {part}"
    if fov_mm is not None and fov_mm >= MAX_HEAD_FOV_MM:
        return NOT_HEAD, f"a {fov_mm:.0f} mm field of view (a head is reconstructed under {MAX_HEAD_FOV_MM:.0f} mm)"
    if part in HEAD_PARTS:
        return "head", f"BodyPartExamined is {part}"
    # the first description that names a region decides (the series' before the study's: "AX HEAD 5mm" of a
    # "CT HEAD AND C-SPINE" study is a head series); within one, a body word beats a head word ("CT HEAD AND
    # CHEST"); "AX 3MM cranio-caudal" names nothing, so its "CT CHEST" study decides
    for text in (d for d in descriptions if d):
        if _BODY_WORDS.search(text):
            return NOT_HEAD, "the study or series description names a body region"
        if _HEAD_WORDS.search(text):
            return "head", "the study or series description names the head"
    return None, ""


@dataclass(frozen=True)
class HeadEvidence:
    """What the image test saw: how many of the checked slices looked like a head, and why the best did not."""

    is_head: bool
    head_slices: int
    checked: int
    reason: str


def image_looks_like_head(hu: np.ndarray, *, spacing_zyx: Sequence[float]) -> HeadEvidence:
    """The image test on a HU volume ``[Z, Y, X]`` (axial slices along Z, as volumes here are ordered) with
    voxel sizes ``spacing_zyx`` (mm): axial slices every :data:`SAMPLE_MM` along the whole z extent (a
    head-and-neck or CTA scan is a head CT whose head is at one end), a head where at least
    :data:`HEAD_SLICES_NEEDED` of them are cranial cross-sections."""
    nz = hu.shape[0]
    dz, dy, dx = (float(s) for s in spacing_zyx)
    step_y, step_x = max(1, int(2.0 / dy + 0.5)), max(1, int(2.0 / dx + 0.5))  # about 2 mm pixels
    step_z = max(1, int(SAMPLE_MM / dz + 0.5))
    picks = list(range(step_z // 2, nz, step_z)) or [nz // 2]
    if len(picks) > MAX_SAMPLES:
        picks = sorted({int(v) for v in np.linspace(0, nz - 1, MAX_SAMPLES).round()})
    pixel_mm = (dy * step_y * dx * step_x) ** 0.5
    results = [_slice_evidence(np.asarray(hu[z, ::step_y, ::step_x]), pixel_mm=pixel_mm) for z in picks]
    head = sum(ok for ok, _ in results)
    needed = min(HEAD_SLICES_NEEDED, len(results))
    if head >= needed:
        return HeadEvidence(True, head, len(results), "")
    reasons = [why for ok, why in results if not ok]
    common = max(reasons, key=reasons.count)  # ties: the first slice's (deterministic)
    why = f"{head} of {len(results)} slices along the scan look like a head ({common})"
    return HeadEvidence(False, head, len(results), why)


def _slice_evidence(sl: np.ndarray, *, pixel_mm: float) -> tuple[bool, str]:
    """Whether one axial slice (HU, square pixels of ``pixel_mm``) is a cross-section of the cranium, and why
    not."""
    pixel_cm2 = pixel_mm**2 / 100
    bone = sl > BONE_HU
    if bone.sum() * pixel_cm2 < 1.0:
        return False, "no bone"
    hull = _convex_hull_mask(bone)
    body = _body(sl)
    area = float((hull | body).sum()) * pixel_cm2
    lo, hi = BODY_AREA_CM2
    if not lo <= area <= hi:
        return False, f"a cross-section of {area:.0f} cm2, not a head's {lo:.0f}-{hi:.0f}"
    inside = hull & ~ndimage.binary_dilation(bone, iterations=1)
    if inside.sum() * pixel_cm2 < 15.0:
        return False, "too little inside the bone"
    ring = _ring_coverage(bone, inside)
    if ring < MIN_RING:
        return False, f"bone in {ring:.0%} of the directions around it, not a skull's ring"
    rim = hull & ~ndimage.binary_erosion(hull)
    beyond = body & ~hull
    outside_mm = float(beyond.sum()) * pixel_mm / max(float(rim.sum()), 1.0)  # mean depth of tissue beyond it
    values = sl[inside]
    air = float(np.mean(values < -200))
    if air > MAX_AIR_FRACTION:
        if ring >= CLOSED_RING and outside_mm <= MAX_PHANTOM_SCALP_MM:  # an empty skull (a phantom), not a chest
            return True, ""
        return False, f"{air:.0%} air inside the bone (lung?)"
    if outside_mm > MAX_SCALP_MM:
        return False, f"{outside_mm:.0f} mm of tissue around the bone (a scalp is under {MAX_SCALP_MM:.0f} mm)"
    fat = float(np.mean((values >= -200) & (values < -20)))
    if fat > MAX_FAT_FRACTION:
        return False, f"{fat:.0%} fat inside the bone"
    brain = float(np.mean((values >= 0) & (values <= 90)))
    if brain < MIN_BRAIN_FRACTION:
        return False, f"{brain:.0%} of the tissue inside the bone at brain density"
    return True, ""


def _body(sl: np.ndarray) -> np.ndarray:
    """The largest connected region above -300 HU, holes filled: the patient (lungs included), not the table."""
    tissue = sl > -300
    labels, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    sizes = ndimage.sum_labels(tissue, labels, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(labels == (1 + int(np.argmax(sizes))))


def _convex_hull_mask(mask: np.ndarray) -> np.ndarray:
    """The filled convex hull of ``mask`` (a 2D boolean array), rasterised by Pillow. The hull's corners are
    among each row's first and last set pixel, so the monotone chain runs on at most two points a row (and
    needs no scipy.spatial, whose import alone cost a first call 0.75 s). Pillow is imported here, so that reading
    DICOM headers (which uses this module's header test) never needs it; hctembed.preprocessing.series loads it
    with itself."""
    from PIL import Image, ImageDraw

    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        return np.zeros_like(mask)
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - 1 - mask[rows, ::-1].argmax(axis=1)
    points = sorted({(int(c), int(r)) for r, a, b in zip(rows, first, last, strict=True) for c in (a, b)})
    hull = _monotone_chain(points)
    canvas = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    if len(hull) >= 3:
        ImageDraw.Draw(canvas).polygon(hull, fill=1, outline=1)
    else:  # all on one line: the line itself
        ImageDraw.Draw(canvas).line(hull if len(hull) > 1 else hull * 2, fill=1)
    return np.asarray(canvas, dtype=bool)


def _monotone_chain(points: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Andrew's monotone chain: the convex hull of sorted ``(x, y)`` points, counter-clockwise."""

    def cross(o, a, b) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[int, int]] = []
    upper: list[tuple[int, int]] = []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1] if len(points) > 2 else points


def _ring_coverage(bone: np.ndarray, inside: np.ndarray) -> float:
    """The fraction of 36 directions (10 degree sectors) from the centre of ``inside`` in which bone lies: coarse
    enough that a skull drawn with 5 mm pixels still fills every sector it surrounds."""
    cy, cx = np.argwhere(inside).mean(axis=0)
    by, bx = np.nonzero(bone)
    sectors = ((np.degrees(np.arctan2(by - cy, bx - cx)) + 180.0) // 10).astype(int) % 36
    return float(np.unique(sectors).size / 36)
