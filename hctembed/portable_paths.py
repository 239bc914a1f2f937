"""Paths as files beside a database store them: relative to the file's folder when they lie inside it, so that
the folder moved or copied as a whole keeps working (the database's ``.models`` weights, an archive beside a
database in its locator)."""

from __future__ import annotations

import os
from pathlib import Path


def stored_path(path: str | None, *, db: Path) -> str | None:
    """A path as the database stores it: relative to the database's folder when it lies inside that folder
    (the ``.models`` weights, an archive beside the database), so that the database moved or copied with its
    folder keeps working; absolute otherwise (an archive elsewhere stays found when the database moves alone)."""
    if not path or not Path(path).is_absolute():
        return path
    folder = Path(os.path.realpath(db)).parent
    try:
        relative = os.path.relpath(os.path.realpath(path), folder)
    except ValueError:  # another drive
        return path
    return path if relative == ".." or relative.startswith(".." + os.sep) else relative


def resolved_path(value: str | None, *, db: Path) -> str | None:
    """A stored path as an absolute one (relative ones are relative to the database's folder); a URL (a PACS's
    DICOMweb root) as it is."""
    if not value or Path(value).is_absolute() or "://" in value:
        return value
    return os.path.normpath(Path(os.path.realpath(db)).parent / value)
