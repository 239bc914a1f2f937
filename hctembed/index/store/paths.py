"""Every file that lives beside a database, derived in one place: ``<db>.faiss/`` (the FAISS indices and their
manifests), ``<db>.models/`` (weights of random-initialised encoders, so queries can be embedded later) and
``<db>.shards/`` (Parquet parts of a sharded run)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
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
    """A stored path as an absolute one (relative ones are relative to the database's folder)."""
    if not value or Path(value).is_absolute():
        return value
    return os.path.normpath(Path(os.path.realpath(db)).parent / value)


@dataclass(frozen=True)
class SidecarPaths:
    db: Path

    def _beside(self, suffix: str) -> Path:
        return Path(str(self.db) + suffix)

    @property
    def faiss(self) -> Path:
        return self._beside(".faiss")

    @property
    def models(self) -> Path:
        return self._beside(".models")

    @property
    def shards(self) -> Path:
        return self._beside(".shards")

    def sweep_temporary(self, *, older_than_s: float = 600.0) -> list[Path]:
        """Remove what an interrupted write left behind (killed, or a full disk): ``*.tmp`` index files and
        ``.<model>.<pid>.safetensors`` weights not finished in ``older_than_s`` seconds (a reader may be
        rebuilding an index right now; nothing takes that long). Returns the paths removed."""
        now, removed = time.time(), []
        for folder, pattern in ((self.faiss, "*.tmp"), (self.models, ".*.safetensors"), (self.models, ".*.json")):
            for path in folder.glob(pattern) if folder.is_dir() else ():
                try:
                    if now - path.stat().st_mtime > older_than_s:
                        path.unlink()
                        removed.append(path)
                except OSError:
                    continue
        return removed

    def index_files(self, collection_id: int) -> tuple[Path, Path]:
        """(the FAISS index, its JSON manifest) of one collection."""
        stem = f"c{collection_id}"
        return self.faiss / f"{stem}.faiss", self.faiss / f"{stem}.json"
