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

import torch
from torch.utils.data import DataLoader, Dataset

from hctembed.config import PreprocessConfig
from hctembed.index.choice import IndexOptions
from hctembed.index.store import Collection, Store, StoreError
from hctembed.index.vectors import VectorIndex, open_index
from hctembed.io.archive import SeriesRef, Skipped, load_series
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


def prepare(ref: SeriesRef, *, config: PreprocessConfig) -> tuple[torch.Tensor, Volume]:
    """Load and preprocess one scan; raises VolumeError with a readable reason."""
    volume = load_series(ref)
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
            x, volume = prepare(ref, config=self.config)
        except VolumeError as exc:
            return Prepared(i, None, str(exc))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a long archive run never dies on one bad scan
            log.debug("unexpected failure on %s", ref.source, exc_info=True)
            return Prepared(i, None, f"{type(exc).__name__}: {exc}")
        meta = {
            **ref.facts,
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


def needs_embedding(ref: SeriesRef, status, *, retry_failed: bool = False) -> bool:
    """New, changed (size or mtime), or failed before when ``retry_failed``."""
    if status is None or (status.file_size, status.file_mtime_ns) != (ref.size, ref.mtime_ns):
        return True
    if status.status == "failed":
        return retry_failed
    return status.status != "embedded"


def embed_archive(
    *,
    refs: Sequence[SeriesRef],
    encoder: Encoder,
    store: Store,
    batch_size: int = 2,
    num_workers: int = 1,
    patients: dict[str, str] | None = None,
    skipped: Sequence[Skipped] = (),
    retry_failed: bool = False,
    progress: Callable[[int], None] | None = None,
    index_kind: str | None = None,
) -> EmbedReport:
    """Embed every scan in ``refs`` not yet embedded for this encoder; returns counts and failures.

    ``skipped`` candidates (not selected when the archive was scanned) are recorded in the status table
    with their reasons. Scans that failed before are tried again only when their files changed, or with
    ``retry_failed``. Scan ids already stored from another archive folder are refused (StoreError).
    Each batch - its vectors, scans and statuses - is one transaction followed by a checkpoint, so a
    killed run loses at most the batch in flight and a re-run picks up from there.
    ``progress(n)`` is called after each batch with the number of scans it handled. ``index_kind``: see
    :func:`refresh_index`.
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
        card=encoder.card,
    )
    collection = store.collection(
        model_id=encoder.model_id,
        fingerprint=encoder.fingerprint,
        dim=encoder.dim,
        preprocess=asdict(encoder.preprocess),
    )
    _refuse_other_archives(store, refs)
    known = store.status(collection)
    with store.transaction():
        for skip in skipped:
            previous = known.get(skip.source)
            reason = f"{skip.reason_code}: {skip.reason}"
            if previous is not None and (previous.status, previous.reason) == ("skipped", reason):
                continue  # already recorded: a re-run leaves the row as it was
            store.record_status(
                collection,
                source=skip.source,
                scan_id=skip.scan_id,
                status="skipped",
                reason=reason,
                file_size=None,
                file_mtime_ns=None,
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
        previous = status.get(ref.source)
        if needs_embedding(ref, previous, retry_failed=retry_failed):
            todo.append(ref)
        elif previous is not None and previous.status == "failed":
            failed.append((ref.source, f"{previous.reason} (unchanged since it failed; --retry-failed tries again)"))
    unchanged = len(refs) - len(todo) - len(failed)
    if progress and len(refs) > len(todo):
        progress(len(refs) - len(todo))
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
            bad = [item for item in batch if item.x is None]
            vectors = encoder.encode(torch.stack([item.x for item in good])) if good else None
            with store.transaction():
                if good:
                    _write_batch(store, collection, [todo[i.position] for i in good], good, vectors, patients or {})
                # a changed file that no longer loads must not keep its old vector
                store.delete_embeddings(collection, scan_ids=[todo[item.position].scan_id for item in bad])
                for item in bad:
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
            store.checkpoint()
            embedded += len(good)
            for item in bad:
                ref = todo[item.position]
                failed.append((ref.source, item.reason or "unknown"))
                log.warning("skipped %s: %s", ref.source, item.reason)
            if progress:
                progress(len(batch))
    refresh_index(store, collection, index_kind=index_kind)
    return EmbedReport(collection, len(refs), embedded, unchanged, failed, time.perf_counter() - start)


def _refuse_other_archives(store: Store, refs: Sequence[SeriesRef]) -> None:
    """Two archives with the same relative file names would overwrite each other's scans: refuse."""
    stored = store.archive_roots([r.scan_id for r in refs])
    clashes = [
        (r.scan_id, stored[r.scan_id], str(r.root)) for r in refs if stored.get(r.scan_id, str(r.root)) != str(r.root)
    ]
    if clashes:
        scan_id, old, new = clashes[0]
        raise StoreError(
            f"{len(clashes)} scan ids of {new} are already stored from {old} (e.g. {scan_id}); "
            "embed this archive into another --db, or give its files other names"
        )


def _write_batch(store, collection, refs, good, vectors, patients) -> None:
    store.upsert_scans(
        [
            {
                "scan_id": r.scan_id,
                "patient_id": r.patient_id or patients.get(r.scan_id),
                "source": r.location or r.source,
                "archive_root": str(r.root),
                "format": r.format,
                "meta": {**item.meta, "flags": sorted(set(item.meta.get("flags", [])) | set(r.flags))},
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


def refresh_index(store: Store, collection: Collection, *, index_kind: str | None = None) -> VectorIndex:
    """Bring the collection's FAISS index in line with DuckDB (rebuilt only when it differs).

    ``index_kind`` (exact | hnsw | ivf | ivfpq | auto) picks the index; ``None`` keeps the saved one's kind.
    """
    options = IndexOptions(kind=index_kind) if index_kind else None
    return open_index(store, collection, quiet=True, options=options)
