"""Public head-CT data-set layouts -> series-level labels keyed like ``hctembed embed`` keys the series.

* **RSNA Intracranial Haemorrhage** (Kaggle 2019): per-slice DICOM files ``ID_<image>.dcm`` in one or
  more folders, and ``stage_2_train.csv`` rows ``ID_<image>_<subtype>,<0|1>``. Slices are grouped into
  series like any archive; a series is positive for a subtype if any of its slices is.
* **CQ500** (qure.ai): one folder per patient (``CQ500CT<n> CQ500CT<n>/...``) holding several series, and
  ``reads.csv`` with three readers' columns (``R1:IPH``, ``R2:IPH``, ``R3:IPH`` ...). A finding is positive
  by majority vote (2 of 3); every series of the patient gets the patient's labels.

Both write a labels CSV with ``scan_id`` (series pseudonym), ``patient_id`` (patient pseudonym) and one
0/1 column per label, which ``hctembed embed --labels`` and ``hctembed bench`` read. Computed with the same
pseudonym secret as ``embed``, the ids match.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from hctembed.errors import InputError
from hctembed.io.archive import scan_archive
from hctembed.io.pseudonym import Pseudonymizer
from hctembed.io.selection import SelectionConfig

log = logging.getLogger(__name__)

RSNA_SUBTYPES = {
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
    "any": "any",
}
CQ500_FINDINGS = (
    "ICH",
    "IPH",
    "IVH",
    "SDH",
    "EDH",
    "SAH",
    "BleedLocation-Left",
    "BleedLocation-Right",
    "MidlineShift",
    "MassEffect",
)


@dataclass(frozen=True)
class DatasetLabels:
    columns: list[str]
    rows: list[dict[str, object]]  # scan_id, patient_id, one int per column
    notes: list[str]

    def write_csv(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["scan_id", "patient_id", *self.columns])
            writer.writeheader()
            writer.writerows(self.rows)


def rsna_labels(
    path: Path,
    *,
    pseudonyms: Pseudonymizer,
    csv_name: str = "stage_2_train.csv",
    selection: SelectionConfig | None = None,
) -> DatasetLabels:
    """Series-level labels for an RSNA layout under ``path`` (the CSV sits in ``path``)."""
    table = path / csv_name
    if not table.exists():
        raise FileNotFoundError(f"RSNA labels not found: {table}")
    image_labels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(table, newline="") as f:
        for row in csv.DictReader(f):
            ident, label = row["ID"], row["Label"]
            image, _, subtype = ident.rpartition("_")
            if subtype not in RSNA_SUBTYPES:
                raise InputError(f"{table}: unknown subtype {subtype!r} in {ident}")
            image_labels[image][RSNA_SUBTYPES[subtype]] = int(label)
    found = scan_archive(path, pseudonyms=pseudonyms, selection=selection)
    columns = list(RSNA_SUBTYPES.values())
    rows, notes = [], []
    unlabelled = 0
    for ref in found.selected:
        per_slice = [image_labels.get(Path(f.split("!")[-1]).stem) for f in ref.files]
        known = [p for p in per_slice if p is not None]
        if not known:
            unlabelled += 1
            continue
        if len(known) < len(per_slice):
            notes.append(f"{ref.scan_id}: {len(per_slice) - len(known)} of {len(per_slice)} slices have no labels")
        row: dict[str, object] = {"scan_id": ref.scan_id, "patient_id": ref.patient_id}
        row.update({c: int(any(p.get(c, 0) for p in known)) for c in columns})
        rows.append(row)
    if unlabelled:
        notes.append(f"{unlabelled} series have no labelled slice and are left out")
    return DatasetLabels(columns=columns, rows=rows, notes=notes)


def _cq500_number(text: str) -> str | None:
    match = re.search(r"CQ500[-_ ]?CT[-_ ]?(\d+)", text, re.IGNORECASE)
    return match.group(1) if match else None


def cq500_labels(
    path: Path, *, pseudonyms: Pseudonymizer, reads_name: str = "reads.csv", selection: SelectionConfig | None = None
) -> DatasetLabels:
    """Series-level labels for CQ500 under ``path``: majority vote of the three readers per finding."""
    reads = path / reads_name
    if not reads.exists():
        raise FileNotFoundError(f"CQ500 reads not found: {reads}")
    votes: dict[str, dict[str, int]] = {}
    with open(reads, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        findings = [c for c in CQ500_FINDINGS if all(f"R{r}:{c}" in fields for r in (1, 2, 3))]
        if not findings:
            raise InputError(f"{reads}: no R1:/R2:/R3: reader columns for {list(CQ500_FINDINGS)}")
        for row in reader:
            number = _cq500_number(row.get("name", ""))
            if number is None:
                continue
            votes[number] = {c: int(sum(int(float(row[f"R{r}:{c}"])) for r in (1, 2, 3)) >= 2) for c in findings}
    found = scan_archive(path, pseudonyms=pseudonyms, selection=selection)
    rows, notes = [], []
    missing = set()
    for ref in found.selected:
        number = _cq500_number(ref.location.split("/")[0])
        if number is None or number not in votes:
            missing.add(ref.location.split("/")[0])
            continue
        rows.append({"scan_id": ref.scan_id, "patient_id": ref.patient_id, **votes[number]})
    if missing:
        notes.append(f"{len(missing)} patient folders have no row in {reads_name}")
    return DatasetLabels(columns=findings, rows=rows, notes=notes)
