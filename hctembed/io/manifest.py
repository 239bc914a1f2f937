"""The archive manifest: one Parquet row per candidate (series or file) with its decision.

Written by ``hctembed scan``, read by ``hctembed embed MANIFEST``. PHI-free: pseudonymous keys, header
facts and reason codes; no path. Where the files lie is written beside it, in the manifest's locator
(``manifest.parquet.locator``, see :mod:`hctembed.io.locator`), which ``embed MANIFEST`` needs and which is not
to be shared. (Manifests of earlier versions held the paths themselves in ``root``, ``location`` and
``files``; they are still read.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hctembed.errors import InputError
from hctembed.io.archive import ArchiveScan, SeriesRef, Skipped
from hctembed.io.dicomweb import DicomWebServer
from hctembed.io.locator import Locator, locator_path

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


def manifest_rows(scan: ArchiveScan) -> list[dict[str, Any]]:
    """One row per candidate; the paths are left to the locator (``root``, ``location``, ``files`` empty)."""
    rows = []
    for ref in scan.selected:
        rows.append(
            {
                "kind": "series" if ref.format in ("dicom", "dicomweb") else "file",
                "decision": "selected",
                "reason_code": None,
                "reason": None,
                "source": ref.source,
                "scan_id": ref.scan_id,
                "patient_id": ref.patient_id,
                "format": ref.format,
                "location": None,
                "root": None,
                "files": [],
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
                "root": None,
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


def write_manifest(scan: ArchiveScan, path: Path) -> int:
    """Write the manifest of ``scan`` atomically, and its locator beside it; returns the number of rows."""
    rows = manifest_rows(scan)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    where = locator_path(path)
    where.unlink(missing_ok=True)  # a locator of an earlier manifest must not lend it stale paths
    with Locator(where) as locator:
        locator.put(scan.locations())
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return len(rows)


def read_manifest(path: Path, *, auth_file: Path | None = None) -> ArchiveScan:
    """Selected SeriesRefs (located through the manifest's locator) and skipped candidates, as written by
    :func:`write_manifest`. Series of a PACS (format ``dicomweb``) are fetched from the URL the locator holds, with
    the credentials of ``auth_file`` (else the environment)."""
    try:
        rows = pq.read_table(path, schema=SCHEMA).to_pylist()
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise InputError(f"{path} is not an hctembed manifest ({exc})") from None
    with Locator(locator_path(path), read_only=True) as locator:
        located = locator.get([r["scan_id"] if r["decision"] == "selected" else r["source"] for r in rows])
    selected, skipped = [], []
    for r in rows:
        facts = json.loads(r["facts"] or "{}")
        if r["decision"] == "selected":
            where = located.get(r["scan_id"])
            if where is None and not r["root"]:
                raise InputError(
                    f"{path}: its locator {locator_path(path).name} is missing or lacks scan {r['scan_id']}; "
                    "the manifest alone does not say where the files are (run `hctembed scan` again)"
                )
            root_text = where.root if where else r["root"]
            remote = None
            if r["format"] == "dicomweb":
                remote = DicomWebServer(url=root_text, auth_file=str(auth_file) if auth_file else None)
                root_text = "."
            root = Path(root_text)
            location = where.location if where else r["location"]
            selected.append(
                SeriesRef(
                    source=r["source"],
                    path=root / location,
                    root=root,
                    remote=remote,
                    scan_id=r["scan_id"],
                    format=r["format"],
                    size=int(r["size"] or 0),
                    mtime_ns=int(r["mtime_ns"] or 0),
                    files=where.files if where else tuple(r["files"] or ()),
                    patient_id=r["patient_id"],
                    location=location,
                    facts=facts,
                    flags=tuple(r["flags"] or ()),
                )
            )
        else:
            where = located.get(r["source"])
            skipped.append(
                Skipped(
                    *(r[k] for k in ("source", "scan_id", "patient_id", "kind", "reason_code", "reason")),
                    facts,
                    location=where.location if where else "",
                )
            )
    roots = {w.root for w in located.values()} or {str(ref.root) for ref in selected}
    return ArchiveScan(selected=selected, skipped=skipped, root=roots.pop() if len(roots) == 1 else None)


def is_manifest(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".parquet"
