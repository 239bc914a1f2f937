"""The ``models`` and ``collections`` tables: which encoders the database knows, and one collection (a vector
table) per (model, preprocessing fingerprint)."""

from __future__ import annotations

import json
from typing import Any

from hctembed.index.store.connection import Database
from hctembed.index.store.errors import ModelMismatchError, StoreError
from hctembed.index.store.paths import resolved_path, stored_path
from hctembed.index.store.rows import CollectionRow, ModelRow


class ModelsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def register(self, row: ModelRow) -> None:
        """Insert a model; a known id must keep its dim and weights digest (else ModelMismatchError)."""
        stored = self.db.one("SELECT dim, weights_digest FROM models WHERE model_id = ?", [row.model_id])
        if stored is not None:
            if int(stored[0]) != row.dim or (stored[1] and row.weights_digest and stored[1] != row.weights_digest):
                raise ModelMismatchError(
                    f"model {row.model_id} is stored with dim {stored[0]} / weights {stored[1]}, "
                    f"but now has dim {row.dim} / weights {row.weights_digest}"
                )
            return
        self.db.run(
            "INSERT INTO models (model_id, name, dim, config, weights_path, weights_digest, card) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                row.model_id,
                row.name,
                row.dim,
                json.dumps(row.config),
                stored_path(row.weights_path, db=self.db.path),
                row.weights_digest,
                json.dumps(row.card or {}),
            ],
        )

    def get(self, model_id: str) -> ModelRow:
        row = self.db.one(
            "SELECT model_id, name, dim, config, weights_path, weights_digest, card FROM models WHERE model_id = ?",
            [model_id],
        )
        if row is None:
            raise StoreError(f"model {model_id} is not in {self.db.path}")
        model_id, name, dim, config, weights_path, digest, card = row
        return ModelRow(
            model_id=model_id,
            name=name,
            dim=int(dim),
            config=json.loads(config) if config else {},
            weights_path=resolved_path(weights_path, db=self.db.path),
            weights_digest=digest,
            card=json.loads(card) if card else {},
        )


class CollectionsRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def find(self, *, model_id: str, fingerprint: str) -> CollectionRow | None:
        row = self.db.one(
            "SELECT collection_id, dim FROM collections WHERE model_id = ? AND fingerprint = ?",
            [model_id, fingerprint],
        )
        return None if row is None else CollectionRow(int(row[0]), model_id, fingerprint, int(row[1]))

    def create(self, *, model_id: str, fingerprint: str, dim: int, preprocess: dict[str, Any] | None) -> CollectionRow:
        """A new collection and its vector table, in one transaction."""
        next_id = self.db.one("SELECT coalesce(max(collection_id), 0) + 1 FROM collections")[0]
        row = CollectionRow(int(next_id), model_id, fingerprint, int(dim))
        with self.db.transaction():
            self.db.run(
                "INSERT INTO collections (collection_id, model_id, fingerprint, preprocess, dim) "
                "VALUES (?, ?, ?, ?, ?)",
                [row.collection_id, model_id, fingerprint, json.dumps(preprocess or {}), row.dim],
            )
            self.db.run(
                f"CREATE TABLE {row.table} (id BIGINT PRIMARY KEY DEFAULT nextval('embedding_id_seq'), "
                f"scan_id VARCHAR NOT NULL UNIQUE, vector FLOAT[{row.dim}] NOT NULL, "
                "created_at TIMESTAMP DEFAULT current_timestamp)"
            )
        return row

    def all(self) -> list[CollectionRow]:
        rows = self.db.rows("SELECT collection_id, model_id, fingerprint, dim FROM collections ORDER BY collection_id")
        return [CollectionRow(int(r[0]), r[1], r[2], int(r[3])) for r in rows]
