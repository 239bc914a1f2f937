"""Walk an archive and list the scans in it (NIfTI files for now)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hctembed.io.nifti import is_nifti, load_nifti, nifti_stem
from hctembed.volume import Volume, VolumeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesRef:
    """One candidate scan in an archive.

    ``source`` is the path relative to ``root`` (POSIX), ``scan_id`` the source without its suffix;
    ``size`` and ``mtime_ns`` tell a re-run whether the file changed.
    """

    source: str
    path: Path
    root: Path
    scan_id: str
    format: str
    size: int
    mtime_ns: int


def discover(archive: str | Path) -> list[SeriesRef]:
    """All NIfTI files under ``archive`` (a folder, searched recursively, or one file), sorted by path."""
    archive = Path(archive)
    if not archive.exists():
        raise FileNotFoundError(f"archive not found: {archive}")
    if archive.is_file():
        walk_root, files = archive.parent, [archive]
    else:
        walk_root = archive
        files = sorted(p for p in archive.rglob("*") if p.is_file() and not p.name.startswith("."))
    root = walk_root.resolve()
    refs, ignored = [], 0
    for path in files:
        if not is_nifti(path):
            ignored += 1
            continue
        rel = path.relative_to(walk_root)
        stat = path.stat()
        scan_id = (rel.parent / nifti_stem(rel)).as_posix()
        refs.append(SeriesRef(rel.as_posix(), path, root, scan_id, "nifti", stat.st_size, stat.st_mtime_ns))
    if ignored:
        log.info("ignored %d files that are not NIfTI under %s", ignored, archive)
    return refs


def load_volume(path: str | Path) -> Volume:
    """Load any supported scan file as a :class:`Volume` (NIfTI for now)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"file not found: {path}")
    if is_nifti(path):
        return load_nifti(path)
    raise VolumeError(f"unsupported file type: {path.name} (expected .nii or .nii.gz)")
