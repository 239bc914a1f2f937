"""Embed an archive: load and preprocess in DataLoader workers, encode in batches, store, index.

The model is loaded once; decoding and resampling run in worker processes while the main process
encodes the previous batch. Each batch is one DuckDB transaction, so an interrupted run keeps every
finished batch, and a re-run skips scans already embedded for the same model and preprocessing
(unless the file changed). A file that cannot be used is recorded with its reason and the run goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hctembed.config import PreprocessConfig
from hctembed.index.store import Collection, Store
from hctembed.index.vectors import VectorIndex, open_index
from hctembed.io.archive import SeriesRef, load_volume
from hctembed.model.encoders import Encoder, persist_weights
from hctembed.preprocess import preprocess
from hctembed.volume import Volume, VolumeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """One dataset item: the model input ``x [C, Z, Y, X]`` or the reason it could not be made."""

    position: int
    x: torch.Tensor | None
    reason: str | None
    meta: dict[str, Any] = field(default_factory=dict)


def prepare(ref_path, *, config: PreprocessConfig) -> tuple[torch.Tensor, Volume]:
    """Load and preprocess one file; raises VolumeError with a readable reason."""
    volume = load_volume(ref_path)
    return preprocess(volume, config=config), volume


class ScanDataset(Dataset):
    """Map-style dataset over SeriesRefs; never raises for a bad scan (returns its reason instead)."""

    def __init__(self, refs: Sequence[SeriesRef], *, config: PreprocessConfig) -> None:
        self.refs = list(refs)
        self.config = config

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> Prepared:
        ref = self.refs[i]
        try:
            x, volume = prepare(ref.path, config=self.config)
        except VolumeError as exc:
            return Prepared(i, None, str(exc))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a long archive run never dies on one bad scan
            log.debug("unexpected failure on %s", ref.source, exc_info=True)
            return Prepared(i, None, f"{type(exc).__name__}: {exc}")
        meta = {
            **volume.meta,
            "shape_xyz": list(volume.shape_xyz),
            "spacing_xyz": [round(s, 4) for s in volume.spacing_xyz],
        }
        return Prepared(i, x, None, meta)


def _collate(items: list[Prepared]) -> list[Prepared]:
    return items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one process per core; no oversubscription


@dataclass(frozen=True)
class EmbedReport:
    collection: Collection
    total: int
    embedded: int
    unchanged: int
    failed: list[tuple[str, str]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["collection"] = asdict(self.collection)
        return d


def needs_embedding(ref: SeriesRef, status) -> bool:
    return (
        status is None
        or status.status != "embedded"
        or (status.file_size, status.file_mtime_ns)
        != (
            ref.size,
            ref.mtime_ns,
        )
    )


def embed_archive(
    *,
    refs: Sequence[SeriesRef],
    encoder: Encoder,
    store: Store,
    batch_size: int = 2,
    num_workers: int = 1,
    patients: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> EmbedReport:
    """Embed every scan in ``refs`` not yet embedded for this encoder; returns counts and failures.

    ``progress(n)`` is called after each batch with the number of scans it handled.
    """
    start = time.perf_counter()
    # a random-initialised encoder is saved beside the database so that queries can be embedded later
    encoder = persist_weights(encoder, folder=Path(str(store.path) + ".models"))
    store.register_model(
        model_id=encoder.model_id,
        name=encoder.name,
        dim=encoder.dim,
        config=encoder.model.config.to_dict(),
        weights_path=encoder.weights_path,
        weights_digest=encoder.weights_digest,
    )
    collection = store.collection(
        model_id=encoder.model_id,
        fingerprint=encoder.fingerprint,
        dim=encoder.dim,
        preprocess=asdict(encoder.preprocess),
    )
    status = store.status(collection)
    seen_ids: dict[str, str] = {}
    todo: list[SeriesRef] = []
    failed: list[tuple[str, str]] = []
    for ref in refs:
        if ref.scan_id in seen_ids:
            reason = f"duplicate scan id {ref.scan_id} (also {seen_ids[ref.scan_id]})"
            store.record_status(
                collection,
                source=ref.source,
                scan_id=None,
                status="failed",
                reason=reason,
                file_size=ref.size,
                file_mtime_ns=ref.mtime_ns,
            )
            failed.append((ref.source, reason))
            continue
        seen_ids[ref.scan_id] = ref.source
        if needs_embedding(ref, status.get(ref.source)):
            todo.append(ref)
    unchanged = len(refs) - len(todo) - len(failed)
    if progress and unchanged:
        progress(unchanged)
    embedded = 0
    if todo:
        loader = DataLoader(
            ScanDataset(todo, config=encoder.preprocess),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            worker_init_fn=_worker_init if num_workers > 0 else None,
            prefetch_factor=2 if num_workers > 0 else None,
            persistent_workers=False,
        )
        for batch in loader:
            good = [item for item in batch if item.x is not None]
            if good:
                vectors = encoder.encode(torch.stack([item.x for item in good]))
                embedded += _store_batch(store, collection, todo, good, vectors, patients or {})
            for item in batch:
                if item.x is None:
                    ref = todo[item.position]
                    store.record_status(
                        collection,
                        source=ref.source,
                        scan_id=ref.scan_id,
                        status="failed",
                        reason=item.reason,
                        file_size=ref.size,
                        file_mtime_ns=ref.mtime_ns,
                    )
                    failed.append((ref.source, item.reason or "unknown"))
                    log.warning("skipped %s: %s", ref.source, item.reason)
            if progress:
                progress(len(batch))
        store.checkpoint()
    refresh_index(store, collection)
    return EmbedReport(collection, len(refs), embedded, unchanged, failed, time.perf_counter() - start)


def _store_batch(
    store: Store,
    collection: Collection,
    todo,
    good: list[Prepared],
    vectors: np.ndarray,
    patients: dict[str, str],
) -> int:
    refs = [todo[item.position] for item in good]
    with store.transaction():
        _write_batch(store, collection, refs, good, vectors, patients)
    return len(refs)


def _write_batch(store, collection, refs, good, vectors, patients) -> None:
    store.upsert_scans(
        [
            {
                "scan_id": r.scan_id,
                "patient_id": patients.get(r.scan_id),
                "source": r.source,
                "archive_root": str(r.root),
                "format": r.format,
                "meta": item.meta,
            }
            for r, item in zip(refs, good, strict=True)
        ]
    )
    store.add_embeddings(collection, scan_ids=[r.scan_id for r in refs], vectors=vectors)
    for r in refs:
        store.record_status(
            collection,
            source=r.source,
            scan_id=r.scan_id,
            status="embedded",
            reason=None,
            file_size=r.size,
            file_mtime_ns=r.mtime_ns,
        )


def refresh_index(store: Store, collection: Collection) -> VectorIndex:
    """Bring the collection's FAISS index in line with DuckDB (rebuilt only when it differs)."""
    return open_index(store, collection, quiet=True)
