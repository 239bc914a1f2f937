"""Patient-level train/validation/test splits (8:1:1 by default): no patient is in two splits.

Patients are shuffled with a seeded generator and taken in that order; each patient goes wholly to the
split whose share of scans is furthest below its target ratio at that point (a greedy fill), so the scan
ratios come close to the targets even when patients have different numbers of scans. The same patient
ids and seed always give the same split, whatever order the scans come in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hctembed.errors import InputError


@dataclass(frozen=True)
class Split:
    """Scan indices ``[n]`` of each part (sorted), and the seed and ratios that made them."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seed: int
    ratios: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "ratios": list(self.ratios),
            "n_train": int(self.train.size),
            "n_val": int(self.val.size),
            "n_test": int(self.test.size),
        }


def patient_split(
    patient_ids: Sequence[str], *, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> Split:
    """Split scans by patient. ``patient_ids [N]``: one id per scan (several scans may share one)."""
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise InputError(f"ratios must be three non-negative numbers, got {ratios}")
    total = sum(ratios)
    target = np.array(ratios) / total
    ids = np.asarray([str(p) for p in patient_ids], dtype=object)
    if any(p in ("", "None") for p in ids):
        raise InputError("every scan needs a patient id for a patient-level split")
    patients = sorted(set(ids.tolist()))  # sorted first: independent of scan order
    order = np.random.default_rng(seed).permutation(len(patients))
    by_patient: dict[str, list[int]] = {}
    for i, p in enumerate(ids):
        by_patient.setdefault(p, []).append(i)
    parts: list[list[int]] = [[], [], []]
    counts = np.zeros(3)
    for k in order:
        members = by_patient[patients[k]]
        # give the patient to the part with the largest deficit after adding it
        after = counts.sum() + len(members)
        deficit = target * after - counts
        deficit[target == 0] = -np.inf
        j = int(np.argmax(deficit))
        parts[j].extend(members)
        counts[j] += len(members)
    train, val, test = (np.array(sorted(p), dtype=np.int64) for p in parts)
    return Split(train=train, val=val, test=test, seed=seed, ratios=ratios)
