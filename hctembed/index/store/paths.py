"""Every file that lives beside a database, derived in one place: ``<db>.faiss/`` (the FAISS indices and their
manifests), ``<db>.models/`` (weights of random-initialised encoders, so queries can be embedded later) and
``<db>.shards/`` (Parquet parts of a sharded run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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

    def index_files(self, collection_id: int) -> tuple[Path, Path]:
        """(the FAISS index, its JSON manifest) of one collection."""
        stem = f"c{collection_id}"
        return self.faiss / f"{stem}.faiss", self.faiss / f"{stem}.json"
