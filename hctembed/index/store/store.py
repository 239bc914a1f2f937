"""The store: one DuckDB file, the source of truth for scans, models, vectors, labels, statuses and probes.

``Store`` opens the file (migrating it when opened for writing), holds one repository per table group
(``models``, ``scans``, ``labels``, ``probes``) and hands out :class:`Collection` objects bound to it for
everything about vectors. Only this package executes SQL.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hctembed.index.store.collection import Collection
from hctembed.index.store.connection import Database
from hctembed.index.store.errors import ModelMismatchError, StoreError
from hctembed.index.store.labels import LabelsRepo
from hctembed.index.store.migrations import SCHEMA_VERSION, migrate, schema_version
from hctembed.index.store.models import CollectionsRepo, ModelsRepo
from hctembed.index.store.paths import SidecarPaths
from hctembed.index.store.probes import ProbesRepo
from hctembed.index.store.scans import ScansRepo
from hctembed.io.locator import Location, Locator

log = logging.getLogger(__name__)


class Store:
    """A database file opened for reading or writing; use as a context manager."""

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.db = Database(path, read_only=read_only)
        self.path = self.db.path
        self.read_only = read_only
        self.paths = SidecarPaths(self.path)
        try:
            if not read_only:
                migrate(self.db, path=self.path)
                for path in self.paths.sweep_temporary():
                    log.info("removed %s, left by an interrupted write", path.name)
                self._move_paths_to_the_locator()
            elif self.schema_version() < SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema v{self.schema_version()}; open it once for writing")
        except BaseException:
            self.db.close()
            raise
        self.models = ModelsRepo(self.db)
        self.scans = ScansRepo(self.db)
        self.labels = LabelsRepo(self.db)
        self.probes = ProbesRepo(self.db)
        self._collections = CollectionsRepo(self.db)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def transaction(self):
        """All writes inside commit together or not at all (see :meth:`Database.transaction`)."""
        return self.db.transaction()

    def checkpoint(self) -> None:
        self.db.checkpoint()

    def schema_version(self) -> int:
        return schema_version(self.db)

    @property
    def store_id(self) -> str:
        """This database file's random identity (created with it; survives copies of the file)."""
        row = self.db.one("SELECT value FROM store_info WHERE key = 'store_id'")
        if row is None:
            raise StoreError(f"{self.path} has no store identity; open it once for writing")
        return str(row[0])

    # -- collections --------------------------------------------------------------------------------------
    def collection(
        self, *, model_id: str, fingerprint: str, dim: int | None = None, preprocess: dict[str, Any] | None = None
    ) -> Collection:
        """The collection for (model, fingerprint); created (with its vector table) when ``dim`` is given."""
        row = self._collections.find(model_id=model_id, fingerprint=fingerprint)
        if row is not None:
            if dim is not None and row.dim != dim:
                raise ModelMismatchError(f"collection {model_id}/{fingerprint} has dim {row.dim}, not {dim}")
            return Collection(self, row)
        if dim is None:
            stored = ", ".join(f"{c.model_id} / {c.fingerprint}" for c in self.collections()) or "none"
            raise ModelMismatchError(
                f"no vectors for model {model_id} with preprocessing {fingerprint} in {self.path}; stored: {stored}"
            )
        return Collection(
            self, self._collections.create(model_id=model_id, fingerprint=fingerprint, dim=dim, preprocess=preprocess)
        )

    def _move_paths_to_the_locator(self) -> None:
        """A database written before the locator kept paths in ``scans``: they move to the locator (written
        first, so a crash in between loses nothing) and leave the database."""
        legacy = ScansRepo(self.db).legacy_locations()
        if not legacy:
            return
        with Locator(self.paths.locator) as locator:
            locator.put(Location(s, root, source) for s, (root, source) in legacy.items())
        with self.db.transaction():
            ScansRepo(self.db).clear_legacy_locations()
        log.info("moved the paths of %d scans from %s to %s", len(legacy), self.path.name, self.paths.locator.name)

    def locations(self, scan_ids: Sequence[str]) -> dict[str, Location]:
        """Where stored scans lie, from the locator beside the database; scans stored before the locator
        existed (the database then held their paths) are found from those columns."""
        with Locator(self.paths.locator, read_only=True) as locator:
            found = locator.get(list(scan_ids))
        legacy = self.scans.legacy_locations([s for s in scan_ids if s not in found])
        return found | {s: Location(s, root, source) for s, (root, source) in legacy.items()}

    def record_locations(self, entries: Sequence[Location]) -> None:
        """Add or update locator entries (the paths kept beside, never in, the database)."""
        if self.read_only:
            raise StoreError(f"{self.path} is open read-only")
        with Locator(self.paths.locator) as locator:
            locator.put(entries)

    def collections(self) -> list[Collection]:
        return [Collection(self, row) for row in self._collections.all()]

    def resolve_collection(self, *, model_id: str | None = None) -> Collection:
        """The collection of ``model_id`` (a prefix), or without one the most recently embedded collection
        (logged, with the others); a clear error when a prefix is ambiguous or matches nothing."""
        every = self.collections()
        chosen = every
        if model_id is not None:
            exact = [c for c in every if c.model_id == model_id]
            chosen = exact or [c for c in every if c.model_id.startswith(model_id)]
        if len(chosen) == 1:
            return chosen[0]
        stored = ", ".join(c.model_id for c in every) or "none"
        if not chosen:
            if model_id is None:
                raise StoreError(f"{self.path} holds no embeddings yet: run `hctembed embed ARCHIVE --db {self.path}`")
            raise StoreError(f"no embeddings for model {model_id} in {self.path}; stored: {stored}")
        if model_id is not None and len({c.model_id for c in chosen}) > 1:
            raise StoreError(f"--model {model_id} matches several models in {self.path} ({stored}); give more of it")
        when = {c.collection_id: c.last_embedded() for c in chosen}  # one query each
        newest = max(
            chosen, key=lambda c: (when[c.collection_id] is not None, when[c.collection_id] or 0, c.collection_id)
        )
        log.warning(
            "%s holds %d collections (%s); using %s / %s, the most recently embedded (choose with --model)",
            self.path.name, len(chosen), ", ".join(f"{c.model_id}/{c.fingerprint}" for c in chosen),
            newest.model_id, newest.fingerprint,
        )  # fmt: skip
        return newest
