"""The options of a DICOMweb archive (``dicomweb+http(s)://HOST:PORT/PATH``), one definition for every command
that reads one (``scan``, ``embed``); see :mod:`hctembed.io.dicomweb`."""

from __future__ import annotations

from pathlib import Path

import typer

AUTH_FILE: Path | None = typer.Option(
    None,
    "--auth-file",
    help='DICOMweb credentials, JSON {"username", "password"} or {"token"} (else $HCTEMBED_DICOMWEB_USERNAME / '
    "_PASSWORD or _TOKEN); never on the command line.",
)
FILTERS: list[str] = typer.Option(
    [], "--filter", help="DICOMweb: a QIDO filter KEY=VALUE, repeatable (Modality=CT, StudyDate=20240101-)."
)
SINCE: str | None = typer.Option(None, "--since", help="DICOMweb: studies from this date on (YYYY-MM-DD).")
ARCHIVE_HELP = (
    "A folder (searched recursively for NIfTI files, DICOM series and zips of DICOM), one NIfTI/DICOM/zip file, a "
    "manifest.parquet written by `hctembed scan`, or a PACS as dicomweb+http(s)://HOST:PORT/PATH."
)
