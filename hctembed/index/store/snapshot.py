"""Snapshots of a database for a server (``hctembed serve``) to read while an ``embed`` writes.

DuckDB lets one process write a file and, while it does, no other process read it. So a server never keeps
the database itself open: it reads the newest snapshot beside it (``<db>.snapshot-<time_ns>``: one file, its
write-ahead log folded in, in the database's folder so that paths stored relative to the database resolve
alike), and what was committed since that time arrives through the live feed
(:mod:`hctembed.index.live_feed`). A snapshot is made

* by a writer (:func:`publish_snapshot`: ``embed`` at the end of a run, the torchrun merge at the end of its
  merge) while a server is attached (:func:`hctembed.index.live_feed.LiveFeed.attached`): a CHECKPOINT folds
  the write-ahead log into the file, which is then copied while the writer's lock keeps everyone out;
* by a reader (:func:`take_snapshot`: the server, at start and whenever the database changed with no writer
  holding it): a read-only connection holds the shared lock, so no writer is connected during the copy; the
  copy and the log are then folded into one file in private.

Every snapshot has a new name, written under a temporary one and renamed, so a reader never opens a file that
is still changing (and DuckDB, which keeps one database per path in a process, never serves an old file under
a reused name). Making one removes the older snapshots and the feed files older than it: it holds them.
"""

from __future__ import annotations

import os
import shutil
import time
from glob import escape as glob_escape
from pathlib import Path

import duckdb

from hctembed.index.store.paths import SidecarPaths

MARK = ".snapshot-"


def snapshot_time(path: Path) -> int:
    """The ``time_ns`` a snapshot's name carries: every batch committed before it is in it."""
    return int(path.name.rsplit(MARK, 1)[1])


def _snapshots(db: Path) -> list[Path]:
    return sorted(p for p in db.parent.glob(f"{glob_escape(db.name)}{MARK}*") if p.name.rsplit(MARK, 1)[1].isdigit())


def latest_snapshot(db: Path) -> Path | None:
    found = _snapshots(Path(db))
    return found[-1] if found else None


def _temporary(db: Path, stamp: int) -> Path:
    return db.parent / f".{db.name}{MARK}{stamp:020d}.{os.getpid()}.tmp"


def _install(tmp: Path, *, db: Path, stamp: int) -> Path:
    """Rename a finished copy into place as the newest snapshot; drop what it makes redundant."""
    db = Path(db)
    target = db.parent / f"{db.name}{MARK}{stamp:020d}"
    os.chmod(tmp, os.stat(db).st_mode & 0o777)  # as private as the database itself
    os.replace(tmp, target)
    for old in _snapshots(db):
        if old != target and snapshot_time(old) < stamp:
            old.unlink(missing_ok=True)  # a server reading it keeps its open file
    from hctembed.index.live_feed import drop_older_than

    drop_older_than(SidecarPaths(db).live, stamp)
    return target


def publish_snapshot(store) -> Path:
    """A snapshot from a database open for writing (its lock keeps every other process out)."""
    store.checkpoint()
    stamp = time.time_ns()
    tmp = _temporary(store.path, stamp)
    try:
        shutil.copyfile(store.path, tmp)
        return _install(tmp, db=store.path, stamp=stamp)
    finally:
        tmp.unlink(missing_ok=True)


def take_snapshot(db: Path) -> Path | None:
    """A snapshot taken holding a read-only connection; None while a writer holds the file."""
    db = Path(db)
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.IOException:
        return None  # an embed is writing: its live feed and, at its end, its own snapshot follow
    stamp = time.time_ns()
    tmp = _temporary(db, stamp)
    wal = Path(str(db) + ".wal")
    try:
        try:
            shutil.copyfile(db, tmp)
            if wal.exists():  # left by a writer that died: fold it into the private copy
                shutil.copyfile(wal, Path(str(tmp) + ".wal"))
        finally:
            con.close()
        if Path(str(tmp) + ".wal").exists():
            folded = duckdb.connect(str(tmp))
            folded.execute("CHECKPOINT")
            folded.close()
        return _install(tmp, db=db, stamp=stamp)
    finally:
        tmp.unlink(missing_ok=True)
        Path(str(tmp) + ".wal").unlink(missing_ok=True)
