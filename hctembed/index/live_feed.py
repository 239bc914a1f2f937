"""The live feed: what ``embed`` (or the torchrun merge) commits, batch by batch, for a server to search before
the run ends. A server that reads a database attaches by creating ``<db>.live/``; from then on every batch
that commits is also written there as one small Parquet file (its vectors with their ids, patients, labels
and montage planes; and the ids it removed), under a temporary name and renamed, so a reader sees whole
files only. No lock is involved: the server tails the folder, applies each file once, in name order (the
names sort by time), and reloads everything from the next snapshot (:mod:`hctembed.index.store.snapshot`).
A run deletes the files it wrote once it has published that snapshot.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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


class LiveFeed:
    """The ``<db>.live/`` folder of one database; :meth:`publish` is a no-op while no server has attached."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.written: list[Path] = []

    @property
    def attached(self) -> bool:
        return self.folder.is_dir()

    def attach(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

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
            pq.write_table(table, tmp)
            os.replace(tmp, path)
        except OSError as exc:  # the feed is a courtesy to a server: the run itself must go on
            log.warning("could not write the live feed for a server (%s); it will see these scans later", exc)
            tmp.unlink(missing_ok=True)
            return None
        self.written.append(path)
        return path

    def remove_written(self) -> None:
        """Delete the files this run wrote (once a snapshot holds what they said)."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()


def read_new(folder: Path, *, seen: set[str]) -> list[LiveBatch]:
    """The files in ``folder`` not in ``seen`` (names), oldest first; ``seen`` is updated."""
    if not folder.is_dir():
        return []
    batches = []
    for path in sorted(folder.glob("*.parquet")):
        if path.name in seen:
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
