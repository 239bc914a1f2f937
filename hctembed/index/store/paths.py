"""Every file that lives beside a database, derived in one place: ``<db>.faiss/`` (the FAISS indices and their
manifests), ``<db>.models/`` (random weights that older versions saved; still read, no longer written),
``<db>.shards/`` (Parquet parts of a sharded run), ``<db>.snapshot-<time>`` and ``<db>.live/`` (what a server
reads while an ``embed`` writes) and ``<db>.locator`` (where each scan's files lie: paths, which the database
never holds; see :mod:`hctembed.io.locator`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path

from hctembed.portable_paths import resolved_path, stored_path

__all__ = ["SidecarPaths", "resolved_path", "stored_path"]


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

    @property
    def locator(self) -> Path:
        return self._beside(".locator")

    @property
    def live(self) -> Path:
        """Batches committed since the last snapshot, for a server (see :mod:`hctembed.index.live_feed`)."""
        return self._beside(".live")

    def sweep_temporary(self, *, older_than_s: float = 600.0) -> list[Path]:
        """Remove what an interrupted write left behind (killed, or a full disk): ``*.tmp`` index files,
        ``.<model>.<pid>.safetensors`` weights and a server's snapshot copies not finished in ``older_than_s``
        seconds (a reader may be rebuilding an index right now; nothing takes that long). Returns the paths
        removed."""
        now, removed = time.time(), []
        snapshots = (self.db.parent, f".{glob_escape(self.db.name)}.snapshot-*.tmp")  # a copy for a server, cut off
        for folder, pattern in (
            (self.faiss, "*.tmp"),
            (self.models, ".*.safetensors"),
            (self.models, ".*.json"),
            snapshots,
        ):
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
