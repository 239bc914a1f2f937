"""The locator: where each scan and each skipped file lies on this machine, kept apart from everything shared
(the entries and names here; the SQLite file itself is :class:`hctembed.index.store.locator.Locator`).

Folder and file names of hospital exports carry names and record numbers (``Doe_John_MRN123/series1/``), so
nothing derived from them goes into the database, the FAISS files, a manifest, JSON output, reports or
pictures: those hold keyed pseudonyms only. The paths needed to open a scan again (search pictures,
``explain``, probes on patch tokens, ``embed MANIFEST``) live in a small SQLite file beside the database
(``h.duckdb.locator``) or the manifest (``manifest.parquet.locator``), created readable by its owner only.
Keep it with the archive; do not share it. Without it everything works except what must reopen a file.

One row per key: a scan id (selected scans) or a skip row's pseudonymous source; ``root`` is the archive
folder (stored relative to the locator's folder when it lies inside it, so both moved together keep
working; absolute otherwise), ``location`` the scan's file or folder relative to it, ``files`` a DICOM series' files
relative to the root (zip members as ``archive.zip!member``), stored compressed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".locator"


def locator_path(beside: Path) -> Path:
    """The locator of a database or manifest file: ``<file>.locator``."""
    return Path(str(beside) + SUFFIX)


@dataclass(frozen=True)
class Location:
    """Where one key's file(s) lie: ``root / location``; ``files`` relative to ``root`` (DICOM series)."""

    key: str
    root: str
    location: str
    files: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return Path(self.root) / self.location


def label_aliases(entries: Iterable[Location]) -> dict[str, str]:
    """Names a labels CSV may key a scan by, mapped to its stored key: the path relative to the archive with
    and without the NIfTI suffix, and the bare file name and stem where no other scan shares them."""
    from hctembed.io.nifti import nifti_stem

    aliases: dict[str, str] = {}
    bare: dict[str, set[str]] = {}
    for e in entries:
        path = Path(e.location)
        stem = nifti_stem(path)
        relative_stem = (path.parent / stem).as_posix()
        for alias in (e.location, relative_stem):
            aliases[alias] = e.key
        for alias in (path.name, stem):
            bare.setdefault(alias, set()).add(e.key)
    for alias, keys in bare.items():
        if len(keys) == 1 and alias not in aliases:
            aliases[alias] = next(iter(keys))
    return aliases
