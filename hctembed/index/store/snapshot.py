"""Snapshots of a database for a server (``hctembed serve``) to read while an ``embed`` writes.

DuckDB lets one process write a file and, while it does, no other process read it. So a server never keeps
the database itself open: it reads ``<db>.snapshot``, a consistent copy beside it (the same folder, so paths
stored relative to the database resolve alike), and what ``embed`` has committed since arrives through the
live feed (:mod:`hctembed.index.live_feed`). A copy is made

* by a writer (:func:`publish_snapshot`: ``embed`` at the end of a run, the torchrun merge at the end of its
  merge), only when a server has attached to the database (a snapshot exists already): a CHECKPOINT folds
  the write-ahead log into the file, which is then copied while the writer's lock keeps everyone out;
* by a reader (:func:`take_snapshot`: the server, at start and whenever the database has changed with no
  writer holding it): a read-only connection holds the shared lock, so no writer can start halfway through
  the copy, and the file and its write-ahead log are copied.

Either way the copy is written under a temporary name and renamed over the old one; a server with the old
one open keeps reading it until it opens the new one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb

from hctembed.index.store.paths import SidecarPaths


def snapshot_path(db: Path) -> Path:
    return SidecarPaths(Path(db)).snapshot


def _copy_atomically(files: list[tuple[Path, Path]]) -> None:
    """Copy each ``(source, target)`` under a temporary name, then rename them into place (WAL first)."""
    staged = []
    for source, target in files:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        staged.append((tmp, target))
    for tmp, target in reversed(staged):
        os.replace(tmp, target)


def publish_snapshot(store) -> Path:
    """Write ``<db>.snapshot`` from a database open for writing (its lock keeps every other process out)."""
    store.checkpoint()
    target = store.paths.snapshot
    Path(str(target) + ".wal").unlink(missing_ok=True)  # the checkpointed copy needs none; a stale one would replay
    _copy_atomically([(store.path, target)])
    return target


def take_snapshot(db: Path) -> Path | None:
    """Copy ``db`` to ``<db>.snapshot`` holding a read-only connection; None while a writer holds the file."""
    db = Path(db)
    target = snapshot_path(db)
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.IOException:
        return None  # an embed is writing: its live feed and, at its end, its own snapshot will follow
    try:
        wal = Path(str(db) + ".wal")
        files = [(db, target)]
        target_wal = Path(str(target) + ".wal")
        if wal.exists():
            files.insert(0, (wal, target_wal))
        else:
            target_wal.unlink(missing_ok=True)
        _copy_atomically(files)
    finally:
        con.close()
    return target


def writer_holds(db: Path) -> bool:
    """Whether another process has ``db`` open for writing (a read-only open is refused)."""
    try:
        duckdb.connect(str(db), read_only=True).close()
    except duckdb.IOException:
        return True
    return False
