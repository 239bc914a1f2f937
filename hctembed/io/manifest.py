"""The archive manifest: one Parquet row per candidate (series or file) with its decision.

Written by ``hctembed scan``, read by ``hctembed embed MANIFEST``. PHI-free: pseudonymous keys, header
facts, reason codes, and paths relative to the archive root (which is stored once, absolute).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hctembed.errors import InputError
from hctembed.io.archive import ArchiveScan, SeriesRef, Skipped

FACT_COLUMNS = (
    "modality",
    "manufacturer",
    "slice_thickness_mm",
    "kvp",
    "kernel",
    "contrast",
    "n_slices",
    "pixel_spacing_mm",
    "orientation",
    "transfer_syntax",
    "multiframe",
    "study_id",
)


def manifest_rows(scan: ArchiveScan, *, root: Path | None = None) -> list[dict[str, Any]]:
    rows = []
    for ref in scan.selected:
        rows.append(
            {
                "kind": "series" if ref.format == "dicom" else "file",
                "decision": "selected",
                "reason_code": None,
                "reason": None,
                "source": ref.source,
                "scan_id": ref.scan_id,
                "patient_id": ref.patient_id,
                "format": ref.format,
                "location": ref.location,
                "root": str(ref.root),
                "files": list(ref.files),
                "size": ref.size,
                "mtime_ns": ref.mtime_ns,
                "flags": list(ref.flags),
                "facts": json.dumps(ref.facts, default=str),
            }
        )
    for skip in scan.skipped:
        rows.append(
            {
                "kind": skip.kind,
                "decision": "skipped",
                "reason_code": skip.reason_code,
                "reason": skip.reason,
                "source": skip.source,
                "scan_id": skip.scan_id,
                "patient_id": skip.patient_id,
                "format": "dicom",
                "location": None,
                "root": str(root) if root else None,
                "files": [],
                "size": None,
                "mtime_ns": None,
                "flags": list(skip.facts.get("flags", [])),
                "facts": json.dumps({k: v for k, v in skip.facts.items() if k != "flags"}, default=str),
            }
        )
    return rows


SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("decision", pa.string()),
        ("reason_code", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
        ("scan_id", pa.string()),
        ("patient_id", pa.string()),
        ("format", pa.string()),
        ("location", pa.string()),
        ("root", pa.string()),
        ("files", pa.list_(pa.string())),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("flags", pa.list_(pa.string())),
        ("facts", pa.string()),
    ]
)


def write_manifest(rows: list[dict[str, Any]], path: Path) -> int:
    """Write :func:`manifest_rows` atomically; returns the number of rows."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return len(rows)


def read_manifest(path: Path) -> ArchiveScan:
    """Selected SeriesRefs and skipped candidates, as written by :func:`write_manifest`."""
    try:
        rows = pq.read_table(path, schema=SCHEMA).to_pylist()
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise InputError(f"{path} is not an hctembed manifest ({exc})") from None
    selected, skipped = [], []
    for r in rows:
        facts = json.loads(r["facts"] or "{}")
        if r["decision"] == "selected":
            root = Path(r["root"])
            selected.append(
                SeriesRef(
                    source=r["source"],
                    path=root / r["location"],
                    root=root,
                    scan_id=r["scan_id"],
                    format=r["format"],
                    size=int(r["size"] or 0),
                    mtime_ns=int(r["mtime_ns"] or 0),
                    files=tuple(r["files"] or ()),
                    patient_id=r["patient_id"],
                    location=r["location"],
                    facts=facts,
                    flags=tuple(r["flags"] or ()),
                )
            )
        else:
            skipped.append(
                Skipped(r["source"], r["scan_id"], r["patient_id"], r["kind"], r["reason_code"], r["reason"], facts)
            )
    return ArchiveScan(selected=selected, skipped=skipped)


def is_manifest(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".parquet"
