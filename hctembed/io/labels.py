"""Read per-scan label files (CSV with ``scan_id``, optional ``patient_id``, one 0/1 column per label)."""

from __future__ import annotations

import csv
import io
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


ROW = "\0row"  # each row dict's own key: its line number in the file (never a header name)
UNKNOWN = {"", "na", "n/a", "nan", "null", "none", "unknown", "?", "-"}  # a blank or NA cell: not known
POSITIVE = {"1", "1.0", "true", "yes", "y", "positive", "pos"}
NEGATIVE = {"0", "0.0", "false", "no", "n", "negative", "neg"}


def read_csv_rows(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV's header and rows as every command reads it: UTF-8 with or without the BOM that Excel's "CSV UTF-8"
    writes (other bytes read as Latin-1, with a warning), header names stripped of spaces, short rows padded
    with blanks (cells that are not there are unknown); InputError for a header named twice or a row with more
    cells than the header, naming the row."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        text = raw.decode("latin-1")
        log.warning("%s is not UTF-8 (byte 0x%02x at offset %d): read as Latin-1", path.name, raw[exc.start], exc.start)
    reader = csv.reader(io.StringIO(text, newline=""))  # only CR/LF end a row (not U+0085 from a Latin-1 "…")
    header = [h.strip() for h in next(reader, [])]
    twice = sorted({h for h in header if header.count(h) > 1 and h})
    if twice:
        raise InputError(f"{path.name}: column {twice[0]!r} is named twice in the header")
    rows = []
    for number, cells in enumerate(reader, start=2):  # row 1 is the header
        if not any(c.strip() for c in cells):
            continue  # a blank line
        if len(cells) > len(header):
            raise InputError(
                f"{path.name}: row {number} has {len(cells)} cells but the header names {len(header)} columns"
            )
        rows.append({h: (cells[i] if i < len(cells) else "") for i, h in enumerate(header)} | {ROW: str(number)})
    return header, rows


def label_value(cell: str) -> float | None:
    """A label cell as 1.0, 0.0 or NaN (blank, NA: unknown); None when it is none of these."""
    text = cell.strip().lower()
    if text in UNKNOWN:
        return float("nan")
    if text in POSITIVE:
        return 1.0
    if text in NEGATIVE:
        return 0.0
    return None


def read_labels(path: str | Path, *, columns: list[str] | None = None) -> LabelTable:
    """Parse a labels CSV (:func:`read_csv_rows`): ``scan_id``, optional ``patient_id``, and label columns whose
    cells are 0/1 (also yes/no, true/false; blank or NA for unknown).

    Without ``columns``, every other column is a label if all its cells read as such; each column left out is
    named in a warning with the first cell that could not be read, so no label is dropped without a word. A
    ``columns`` name that is missing, or a cell of one that cannot be read, is a one-line InputError naming the
    row and the column.
    """
    path = Path(path)
    fields, rows = read_csv_rows(path)
    if "scan_id" not in fields:
        raise InputError(f"{path.name}: no scan_id column (columns: {', '.join(fields) or 'none'})")
    candidates = [c for c in fields if c not in ID_COLUMNS and c]
    if columns is None:
        columns = []
        for c in candidates:
            bad = _first_unreadable(rows, c)
            if bad is None and any(label_value(r[c]) == label_value(r[c]) for r in rows):
                columns.append(c)
            elif bad is None:
                log.warning("%s: column %r left out: every cell is blank or NA", path.name, c)
            else:
                log.warning(
                    "%s: column %r left out: row %s holds %r, not 0/1 (blank or NA for unknown)",
                    path.name, c, bad[ROW], bad[c].strip()[:40],
                )  # fmt: skip
    else:
        missing = [c for c in columns if c not in fields]
        if missing:
            raise InputError(f"{path.name}: no column(s) {missing} (columns: {', '.join(fields)})")
        for c in columns:
            bad = _first_unreadable(rows, c)
            if bad is not None:
                raise InputError(
                    f"{path.name}: row {bad[ROW]}, column {c!r}: {bad[c].strip()[:40]!r} is not 0/1 "
                    "(blank or NA for unknown)"
                )
    scan_ids = []
    for r in rows:
        scan_id = r["scan_id"].strip()
        if not scan_id:
            raise InputError(f"{path.name}: row {r[ROW]} has no scan_id")
        scan_ids.append(scan_id)
    seen: set[str] = set()
    dupes = {s for s in scan_ids if s in seen or seen.add(s)}
    if dupes:
        raise InputError(f"{path.name}: duplicate scan ids, e.g. {sorted(dupes)[:3]}")
    values = np.array([[label_value(r[c]) for c in columns] for r in rows], dtype=np.float64)
    values = values.reshape(len(rows), len(columns))
    patients = [(r.get("patient_id") or "").strip() or None for r in rows]
    return LabelTable(scan_ids=scan_ids, patient_ids=patients, names=list(columns), values=values)


def _first_unreadable(rows: list[dict[str, str]], column: str) -> dict[str, str] | None:
    return next((r for r in rows if label_value(r[column]) is None), None)
