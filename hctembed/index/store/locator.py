"""The locator file (:mod:`hctembed.io.locator`): a small SQLite table of where each key's files lie, beside a
database or manifest, created readable by its owner only. SQLite rather than DuckDB: a second, tiny file
that a search or a server reads while an ``embed`` writes to it."""

from __future__ import annotations

import json
import os
import sqlite3
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from hctembed.errors import InputError
from hctembed.io.locator import Location
from hctembed.portable_paths import resolved_path, stored_path

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
