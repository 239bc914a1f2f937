"""The live feed: what ``embed`` (or the torchrun merge) commits, batch by batch, for a server to search before
the run ends. A running server attaches to a database by keeping a heartbeat file in ``<db>.live/`` (touched
every poll, removed when it stops); while one is fresh, every batch that commits is also written there as one
small Parquet file named by the time it was written (its vectors with their ids, patients, labels and montage
planes; and the scans whose vectors it removed), under a temporary name and renamed, so a reader sees whole
files only. No lock is involved: the server applies each file newer than its snapshot once, in name (time)
order. A snapshot (:mod:`hctembed.index.store.snapshot`) holds every batch committed before its time, so
making one deletes the feed files older than it, whoever wrote them (a run that was killed included).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hctembed.processes import process_alive

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("op", pa.string()),  # "add" or "delete"
        ("collection_id", pa.int64()),
        ("model_id", pa.string()),
        ("fingerprint", pa.string()),
        ("id", pa.int64()),
        ("scan_id", pa.string()),
        ("patient_id", pa.string()),
        ("labels", pa.string()),  # JSON {name: value}
        ("planes", pa.binary()),
        ("vector", pa.list_(pa.float32())),
    ]
)


@dataclass(frozen=True)
class LiveBatch:
    """One committed batch as a server applies it."""

    name: str
    rows: list[dict]


HEARTBEAT_S = 120.0  # a server whose heartbeat is older than this is gone (killed): nobody reads the feed


def _running(heartbeat_name: str) -> bool:
    """Whether the server of a heartbeat named ``.server-<host>-<pid>-<ns>`` may still run: on another host it
    may (its age decides); on this one, only if its process exists."""
    parts = heartbeat_name.split("-")
    if len(parts) < 4 or not parts[-2].isdigit():
        return True  # an older name: its age decides
    host, pid = "-".join(parts[1:-2]), int(parts[-2])
    return host != socket.gethostname() or process_alive(pid)


def feed_time(name: str) -> int:
    """The ``time_ns`` a feed file's name starts with."""
    return int(name.split("-", 1)[0])


def drop_older_than(folder: Path, stamp: int) -> None:
    """Delete the feed files written before ``stamp`` (a snapshot of that time holds them)."""
    for path in folder.glob("*.parquet") if folder.is_dir() else ():
        if feed_time(path.name) < stamp:
            path.unlink(missing_ok=True)


class LiveFeed:
    """The ``<db>.live/`` folder of one database; :meth:`publish` is a no-op while no server is attached.

    The folder and every file in it get the database's permissions (``like``, the database file, when it
    exists): the feed holds vectors, labels and pictures of the scans, so a private database keeps a private
    feed. A heartbeat is named by the server's host and pid; one of a process on this host that is gone (a
    server killed, or stopped without its goodbye) counts for nothing, whatever its age."""

    def __init__(self, folder: Path, *, like: Path | None = None) -> None:
        self.folder = Path(folder)
        self.like = Path(like) if like is not None else None
        self.heartbeat = self.folder / f".server-{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"

    @property
    def attached(self) -> bool:
        """Whether a server has touched its heartbeat in the last :data:`HEARTBEAT_S` seconds and, when it runs
        on this host, is still running."""
        now = time.time()
        for beat in self.folder.glob(".server-*") if self.folder.is_dir() else ():
            try:
                fresh = now - beat.stat().st_mtime < HEARTBEAT_S
            except FileNotFoundError:
                continue
            if fresh and _running(beat.name):
                return True
        return False

    def beat(self) -> None:
        """A server says it is reading (call at least every :data:`HEARTBEAT_S` seconds)."""
        self._make_folder()
        self.heartbeat.touch()
        self._private(self.heartbeat)

    def detach(self) -> None:
        self.heartbeat.unlink(missing_ok=True)

    def _mode(self) -> int | None:
        try:
            return os.stat(self.like).st_mode & 0o666 if self.like is not None else None
        except OSError:
            return None

    def _make_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        mode = self._mode()
        if mode is not None:  # a folder needs x where the file has r
            os.chmod(self.folder, mode | ((mode & 0o444) >> 2))

    def _private(self, path: Path) -> None:
        mode = self._mode()
        if mode is not None:
            os.chmod(path, mode)

    def publish(
        self,
        *,
        collection_id: int,
        model_id: str,
        fingerprint: str,
        ids: Sequence[int],
        scan_ids: Sequence[str],
        vectors: np.ndarray,
        patients: Sequence[str | None],
        labels: Sequence[dict],
        planes: Sequence[bytes | None],
        deleted: Sequence[str] = (),
    ) -> Path | None:
        """Write one committed batch: ``vectors [n, dim]`` with their ``ids`` (a scan's new vector replaces its
        old one), and the scans whose vectors were ``deleted``."""
        if not self.attached or (len(ids) == 0 and len(deleted) == 0):
            return None
        n, gone = len(ids), len(deleted)
        table = pa.table(
            {
                "op": ["add"] * n + ["delete"] * gone,
                "collection_id": [collection_id] * (n + gone),
                "model_id": [model_id] * (n + gone),
                "fingerprint": [fingerprint] * (n + gone),
                "id": [int(i) for i in ids] + [None] * gone,
                "scan_id": list(scan_ids) + list(deleted),
                "patient_id": list(patients) + [None] * gone,
                "labels": [json.dumps(x) for x in labels] + [None] * gone,
                "planes": list(planes) + [None] * gone,
                "vector": [v.tolist() for v in np.asarray(vectors, np.float32)] + [None] * gone,
            },
            schema=SCHEMA,
        )
        path = self.folder / f"{time.time_ns():020d}-{os.getpid()}.parquet"
        tmp = self.folder / f".{path.name}.tmp"
        try:
            self._make_folder()
            pq.write_table(table, tmp)
            self._private(tmp)
            os.replace(tmp, path)
        except OSError as exc:  # the feed is a courtesy to a server: the run itself must go on
            log.warning("could not write the live feed for a server (%s); it will see these scans later", exc)
            tmp.unlink(missing_ok=True)
            return None
        return path


def read_new(folder: Path, *, seen: set[str], since: int = 0) -> list[LiveBatch]:
    """The files in ``folder`` written at or after ``since`` (``time_ns``) and not in ``seen`` (names), oldest
    first; ``seen`` gets their names."""
    if not folder.is_dir():
        return []
    batches = []
    for path in sorted(folder.glob("*.parquet")):
        if path.name in seen or feed_time(path.name) < since:
            continue
        try:
            rows = pq.read_table(path).to_pylist()
        except FileNotFoundError:  # removed by its run after a snapshot: the snapshot holds it
            continue
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning("skipping unreadable live feed file %s (%s)", path.name, exc)
            seen.add(path.name)
            continue
        seen.add(path.name)
        batches.append(LiveBatch(path.name, rows))
    return batches
