"""Synthetic patients: one head anatomy plus a set of haemorrhages, rendered at arbitrary world points.

:func:`make_patient` draws the anatomy first and then one independent seed per subtype, so the same
generator state gives the same head whatever subset of haemorrhages is requested -- the with/without
comparison the tests rely on. :func:`render_points` is the single place where anatomy and lesions meet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hctembed.errors import InputError

from .anatomy import HeadAnatomy, Tissue, TissueHU, sample_anatomy
from .lesions import SUBTYPES, Lesion, sample_lesion

__all__ = ["SyntheticPatient", "choose_subtypes", "make_patient", "render_points"]

_BLOOD = np.array([int(Tissue[k]) for k in SUBTYPES])
_TEXTURE_AMP = TissueHU.texture_table()


@dataclass(frozen=True, eq=False)
class SyntheticPatient:
    """A synthetic head with its haemorrhages; all geometry in world mm."""

    patient_id: str
    subtypes: frozenset[str]
    anatomy: HeadAnatomy
    lesions: tuple[Lesion, ...]

    def labels(self) -> dict[str, int]:
        """0/1 per subtype, in :data:`SUBTYPES` order."""
        return {k: int(k in self.subtypes) for k in SUBTYPES}


def make_patient(
    *, patient_id: str, subtypes: frozenset[str], rng: np.random.Generator, lesion_scale: float = 1.0
) -> SyntheticPatient:
    """Draw a head and the requested haemorrhage subtypes (a subset of :data:`SUBTYPES`; empty = normal), each
    ``lesion_scale`` times its default linear size."""
    unknown = set(subtypes) - set(SUBTYPES)
    if unknown:
        raise InputError(f"unknown haemorrhage subtypes {sorted(unknown)}; expected a subset of {SUBTYPES}")
    anatomy = sample_anatomy(rng=rng)
    seeds = rng.integers(0, 2**63 - 1, size=len(SUBTYPES))
    lesions = tuple(
        sample_lesion(kind=kind, anatomy=anatomy, rng=np.random.default_rng(int(seed)), scale=lesion_scale)
        for kind, seed in zip(SUBTYPES, seeds, strict=True)
        if kind in subtypes
    )
    return SyntheticPatient(
        patient_id=patient_id,
        subtypes=frozenset(subtypes),
        anatomy=anatomy,
        lesions=lesions,
    )


def choose_subtypes(*, rng: np.random.Generator, normal_fraction: float) -> frozenset[str]:
    """Random subtype combination: empty with probability ``normal_fraction``, otherwise one primary
    subtype (uniform) plus each other subtype with probability 0.12 -- about 19% prevalence per subtype
    at the default ``normal_fraction`` of 0.35, with co-occurrences."""
    if rng.random() < normal_fraction:
        return frozenset()
    primary = SUBTYPES[int(rng.integers(len(SUBTYPES)))]
    extra = rng.random(len(SUBTYPES)) < 0.12
    return frozenset(k for k, e in zip(SUBTYPES, extra, strict=True) if e or k == primary)


def render_points(*, patient: SyntheticPatient, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free tissue at world points ``pts`` ``[N, 3]`` (mm) -> ``(labels [N] uint8, hu [N] float32)``."""
    anatomy = patient.anatomy
    p = np.asarray(pts, dtype=np.float32) - np.asarray(anatomy.center_mm, dtype=np.float32)
    labels, idx, cavity, dirs = anatomy.render_head(p)
    if idx.size:
        labels[idx] = _render_cavity(patient, p[idx], cavity, dirs)
    lut = anatomy.hu.table({lesion.label: lesion.hu for lesion in patient.lesions})
    hu = lut[labels]
    amp = _TEXTURE_AMP[labels]
    tex = np.flatnonzero(amp > 0)
    if tex.size:
        hu[tex] += amp[tex] * anatomy.texture(p[tex])
    blood = np.flatnonzero(np.isin(labels, _BLOOD))
    hu[blood] = np.clip(hu[blood], 55.0, 80.0)
    return labels, hu


def _render_cavity(
    patient: SyntheticPatient,
    p: np.ndarray,
    depth: np.ndarray,
    dirs: np.ndarray,
) -> np.ndarray:
    """Labels ``[M]`` of cranial-cavity points ``p`` ``[M, 3]`` (head-centred) at cavity depth ``depth``."""
    extra = np.zeros(len(p), dtype=np.float32)
    extra_label = np.zeros(len(p), dtype=np.uint8)
    for lesion in patient.lesions:
        t = lesion.thickness(dirs)
        if t is not None:
            bigger = t > extra
            extra[bigger] = t[bigger]
            extra_label[bigger] = lesion.label
    w = p
    for lesion in patient.lesions:
        w = lesion.warp(w)
    effaced = np.clip(extra / 2.0, 0.0, 1.0)
    labels, part = patient.anatomy.render_brain(w=w, depth=depth - extra, effaced=effaced)
    for lesion in patient.lesions:
        lesion.paint(anatomy=patient.anatomy, p=p, labels=labels, part=part)
    collection = depth < extra
    labels[collection] = extra_label[collection]
    return labels
