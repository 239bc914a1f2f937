"""Read per-scan label files (CSV with ``scan_id``, optional ``patient_id``, one 0/1 column per label)."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hctembed.errors import InputError

log = logging.getLogger(__name__)

ID_COLUMNS = ("scan_id", "patient_id")


@dataclass(frozen=True)
class LabelTable:
    """Labels of N scans: ``values [N, L]`` float (0/1, NaN = unknown) for ``names`` (L)."""

    scan_ids: list[str]
    patient_ids: list[str | None]
    names: list[str]
    values: np.ndarray

    def for_scans(self, scan_ids: list[str]) -> np.ndarray:
        """``[len(scan_ids), L]`` rows in the given order; NaN rows for scans without labels."""
        row = {s: i for i, s in enumerate(self.scan_ids)}
        out = np.full((len(scan_ids), len(self.names)), np.nan)
        for i, s in enumerate(scan_ids):
            if s in row:
                out[i] = self.values[row[s]]
        return out

    def rekeyed(self, aliases: dict[str, str]) -> LabelTable:
        """The table with rows keyed by another name of a scan (its file name, stem or path: see
        :func:`hctembed.io.locator.label_aliases`) re-keyed by its id; rows already keyed by an id stay."""
        if not aliases:
            return self
        ids = set(aliases.values())
        scan_ids = [s if s in ids else aliases.get(s, s) for s in self.scan_ids]
        if len(set(scan_ids)) != len(scan_ids):
            seen: set[str] = set()
            twice = sorted({s for s in scan_ids if s in seen or seen.add(s)})
            raise InputError(f"labels name one scan twice (by its id and by its file name?), e.g. {twice[:3]}")
        renamed = sum(a != b for a, b in zip(scan_ids, self.scan_ids, strict=True))
        if renamed:
            log.info("labels: %d rows keyed by file name or path joined to their scans' ids", renamed)
        return LabelTable(scan_ids=scan_ids, patient_ids=self.patient_ids, names=self.names, values=self.values)

    def patients(self) -> dict[str, str]:
        return {s: p for s, p in zip(self.scan_ids, self.patient_ids, strict=True) if p}


def read_labels(path: str | Path, *, columns: list[str] | None = None) -> LabelTable:
    """Parse a labels CSV. Without ``columns``, every column whose non-empty values are all 0 or 1 is a label.

    Raises:
        ValueError: no ``scan_id`` column, duplicate scan ids, a named column missing or not 0/1.
    """
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    if "scan_id" not in fields:
        raise InputError(f"{path}: no scan_id column (columns: {fields})")
    candidates = [c for c in fields if c not in ID_COLUMNS]
    if columns is None:
        columns = [c for c in candidates if _is_binary([r[c] for r in rows])]
    else:
        missing = [c for c in columns if c not in fields]
        if missing:
            raise InputError(f"{path}: no column(s) {missing}")
        not_binary = [c for c in columns if not _is_binary([r[c] for r in rows])]
        if not_binary:
            raise InputError(f"{path}: column(s) {not_binary} hold values other than 0/1")
    scan_ids = [r["scan_id"].strip() for r in rows]
    seen: set[str] = set()
    dupes = {s for s in scan_ids if s in seen or seen.add(s)}
    if dupes:
        raise InputError(f"{path}: duplicate scan ids, e.g. {sorted(dupes)[:3]}")
    values = np.array(
        [[float(r[c]) if r[c].strip() != "" else np.nan for c in columns] for r in rows], dtype=np.float64
    ).reshape(len(rows), len(columns))
    patients = [(r.get("patient_id") or "").strip() or None for r in rows]
    return LabelTable(scan_ids=scan_ids, patient_ids=patients, names=list(columns), values=values)


def _is_binary(values: list[str]) -> bool:
    present = [v.strip() for v in values if v is not None and v.strip() != ""]
    return bool(present) and all(v in {"0", "1", "0.0", "1.0"} for v in present)
