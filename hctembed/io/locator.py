"""The locator: where each scan and each skipped file lies on this machine, kept apart from everything shared
(the entries and names here, and the SQLite file that holds them: :class:`Locator`).

Folder and file names of hospital exports carry names and record numbers (``Doe_John_MRN123/series1/``), so
nothing derived from them goes into the database, the FAISS files, a manifest, JSON output, reports or
pictures: those hold keyed pseudonyms only. The paths needed to open a scan again (search pictures,
``explain``, probes on patch tokens, ``embed MANIFEST``) live in a small SQLite file beside the database
(``h.duckdb.locator``) or the manifest (``manifest.parquet.locator``), created readable by its owner only.
Keep it with the archive; do not share it. Without it everything works except what must reopen a file.

One row per key: a scan id (selected scans) or a skip row's pseudonymous source; ``root`` is the archive
folder (stored relative to the locator's folder when it lies inside it, so both moved together keep
working; absolute otherwise), ``location`` the scan's file or folder relative to it, ``files`` a DICOM series' files
relative to the root (zip members as ``archive.zip!member``), stored compressed. A PACS series' root is the
server's DICOMweb URL and its location ``STUDY/SERIES`` (UIDs).

The file is SQLite rather than DuckDB: a second, tiny file that a search or a server reads while an ``embed``
writes to it, created readable by its owner only (:class:`Locator`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hctembed.errors import InputError
from hctembed.portable_paths import resolved_path, stored_path

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


_SCHEMA = "CREATE TABLE IF NOT EXISTS locations (key TEXT PRIMARY KEY, root TEXT, location TEXT, files BLOB)"


class Locator:
    """The locator file at ``path``; a missing file reads as empty and is created on the first write."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self._con: sqlite3.Connection | None = None

    def __enter__(self) -> Locator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def _connection(self, *, create: bool) -> sqlite3.Connection | None:
        if self._con is not None:
            return self._con
        if not self.path.exists():
            if not create:
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # owner only, before anything is written
        uri = f"{self.path.resolve().as_uri()}?mode={'ro' if self.read_only else 'rw'}"
        try:
            con = sqlite3.connect(uri, uri=True, timeout=30.0)
            if not self.read_only:
                con.execute(_SCHEMA)
                con.commit()
            con.execute("SELECT count(*) FROM locations").fetchone()
        except sqlite3.DatabaseError as exc:
            raise InputError(f"{self.path} is not a readable locator file ({exc}); delete it to start anew") from None
        self._con = con
        return con

    def put(self, entries: Iterable[Location]) -> int:
        """Insert or replace ``entries`` in one transaction; returns how many."""
        if self.read_only:
            raise InputError(f"{self.path} is open read-only")
        rows = [(e.key, stored_path(e.root, db=self.path), e.location, _pack(e.files)) for e in entries]
        if not rows:
            return 0
        con = self._connection(create=True)
        with con:
            con.executemany("INSERT OR REPLACE INTO locations VALUES (?, ?, ?, ?)", rows)
        return len(rows)

    def get(self, keys: Sequence[str]) -> dict[str, Location]:
        """``{key: Location}`` for the known ``keys``."""
        con = self._connection(create=False)
        if con is None or not keys:
            return {}
        found: dict[str, Location] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            for key, root, location, files in con.execute(
                f"SELECT key, root, location, files FROM locations WHERE key IN ({marks})", chunk
            ):
                found[key] = Location(key, resolved_path(root, db=self.path), location, _unpack(files))
        return found

    def all(self) -> list[Location]:
        """Every entry, sorted by key."""
        con = self._connection(create=False)
        if con is None:
            return []
        rows = con.execute("SELECT key, root, location, files FROM locations ORDER BY key").fetchall()
        return [Location(k, resolved_path(r, db=self.path), loc, _unpack(f)) for k, r, loc, f in rows]


def _pack(files: Sequence[str]) -> bytes | None:
    return zlib.compress(json.dumps(list(files)).encode(), 6) if files else None


def _unpack(blob: bytes | None) -> tuple[str, ...]:
    return tuple(json.loads(zlib.decompress(blob))) if blob else ()
