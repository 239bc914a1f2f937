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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from hctembed.embedding.loading import Loading, Outcome, encode_refs
from hctembed.index.choice import IndexOptions
from hctembed.index.live_feed import LiveFeed
from hctembed.index.store import Collection, CollectionRow, ModelRow, ScanRow, StatusRow, Store, StoreError
from hctembed.index.vectors import VectorIndex, open_index
from hctembed.io.admission import Limits
from hctembed.io.archive import SeriesRef, Skipped
from hctembed.io.locator import Location
from hctembed.model.encoders import Encoder
from hctembed.volume import MAX_VOXELS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedReport:
    collection: CollectionRow
    total: int
    embedded: int
    unchanged: int
    failed: list[tuple[str, str]]
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason): not a head, say

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def needs_embedding(ref: SeriesRef, status, *, retry_failed: bool = False, retry_skipped: bool = False) -> bool:
    """New, changed (size or mtime), failed before when ``retry_failed``, or skipped when loaded before (not a
    head) when ``retry_skipped`` (``--allow-non-head``)."""
    if status is None or (status.file_size, status.file_mtime_ns) != (ref.size, ref.mtime_ns):
        return True
    if status.status == "failed":
        return retry_failed
    if status.status == "skipped":
        return retry_skipped
    return status.status != "embedded"


@dataclass(frozen=True)
class Plan:
    """Which scans of a run to embed (with their positions in the refs), and which to leave."""

    todo: list[tuple[int, SeriesRef]]
    duplicates: list[Outcome]  # a scan id met twice: the later file fails
    failed_before: list[tuple[str, str]]  # unchanged files that failed in an earlier run
    unchanged: int
    skipped_before: list[tuple[str, str]] = field(default_factory=list)  # unchanged, skipped when loaded before


def plan_run(
    refs: Sequence[SeriesRef], status: dict, *, retry_failed: bool = False, retry_skipped: bool = False
) -> Plan:
    """Split ``refs`` by their stored ``status`` (``{source: StatusRow}``); deterministic in refs' order."""
    seen: dict[str, str] = {}
    todo, duplicates, failed_before, skipped_before = [], [], [], []
    for position, ref in enumerate(refs):
        if ref.scan_id in seen:
            reason = f"duplicate scan id {ref.scan_id} (also {seen[ref.scan_id]})"
            duplicates.append(replace(Outcome.of(position, ref, reason=reason), scan_id=""))
            continue
        seen[ref.scan_id] = ref.source
        previous = status.get(ref.source)
        if needs_embedding(ref, previous, retry_failed=retry_failed, retry_skipped=retry_skipped):
            todo.append((position, ref))
        elif previous is not None and previous.status == "failed":
            failed_before.append(
                (ref.source, f"{previous.reason} (unchanged since it failed; --retry-failed tries again)")
            )
        elif previous is not None and previous.status == "skipped":
            skipped_before.append((ref.source, previous.reason or ""))
    unchanged = len(refs) - len(todo) - len(duplicates) - len(failed_before) - len(skipped_before)
    return Plan(todo, duplicates, failed_before, unchanged, skipped_before)


def register(store: Store, encoder: Encoder) -> Collection:
    """Record the encoder in ``models`` and return (creating it if new) its collection."""
    store.models.register(
        ModelRow(
            model_id=encoder.model_id,
            name=encoder.name,
            dim=encoder.dim,
            config=encoder.model.config.to_dict(),
            weights_path=encoder.weights_path,
            weights_digest=encoder.weights_digest,
            card=encoder.card or {},
        )
    )
    return store.collection(
        model_id=encoder.model_id,
        fingerprint=encoder.fingerprint,
        dim=encoder.dim,
        preprocess=asdict(encoder.preprocess),
    )


def record_skipped(collection: Collection, skipped: Sequence[Skipped], *, known: dict) -> None:
    """Status rows for candidates not selected; a re-run leaves rows already recorded with the same reason.

    ``known``: the collection's status as read before (``collection.status()``); skipped candidates are never
    selected ones, so the caller can keep using it for the selected scans afterwards.
    """
    rows: dict[str, StatusRow] = {}  # by source: one status row per candidate
    dropped = []  # embedded before, skipped now (a rule that came later: not a head): their vectors go too
    for skip in skipped:
        previous = known.get(skip.source)
        reason = f"{skip.reason_code}: {skip.reason}"
        if previous is not None and (previous.status, previous.reason) == ("skipped", reason):
            continue
        if previous is not None and previous.status == "embedded" and skip.scan_id:
            dropped.append(skip.scan_id)
        rows[skip.source] = StatusRow(source=skip.source, scan_id=skip.scan_id, status="skipped", reason=reason)
    with collection.store.transaction():
        collection.record_statuses(list(rows.values()))
        collection.delete(dropped)


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
    checkpoint_seconds: float = 30.0,
    max_voxels: int = MAX_VOXELS,
    zip_limits: Limits | None = None,
    locations: Sequence[Location] = (),
    allow_non_head: bool = False,
    preprocess_device: str | None = None,
    feed: LiveFeed | None = None,
) -> EmbedReport:
    """Embed every scan in ``refs`` not yet embedded for this encoder; returns counts and failures.

    ``skipped`` candidates (not selected when the archive was scanned) are recorded in the status table
    with their reasons. Scans that failed before are tried again only when their files changed, or with
    ``retry_failed``. Scan ids already stored from another archive folder are refused (StoreError).
    Each batch - its vectors, scans and statuses - is one committed transaction, so a killed run loses at
    most the batch in flight and a re-run picks up from there; the write-ahead log is folded into the file
    (CHECKPOINT) every ``checkpoint_seconds`` and at the end.
    ``progress(n)`` is called after each batch with the number of scans it handled. ``index_kind``: see
    :func:`refresh_index`. Where each scan lies (and ``locations`` of skipped candidates) goes to the locator
    beside the database, never into it. A scan whose image is not a head is skipped (``not_head``) unless
    ``allow_non_head``, which also tries again those skipped so before. ``preprocess_device`` (e.g. "cuda"):
    the DataLoader workers only decode, and the resample, windows and crop run there (see
    :class:`hctembed.embedding.loading.Loading`); None preprocesses in the workers. Each committed batch also
    goes to ``feed`` when a server has attached to it.
    """
    start = time.perf_counter()
    collection = register(store, encoder)
    refuse_other_archives(store, [(r.scan_id, r.located().root) for r in refs if r.remote is None])
    store.record_locations([r.located() for r in refs] + list(locations))
    known = collection.status()
    record_skipped(collection, skipped, known=known)
    plan = plan_run(refs, known, retry_failed=retry_failed, retry_skipped=allow_non_head)
    with store.transaction():
        ids = store_outcomes(collection, plan.duplicates, None)
    publish_batch(feed, collection, plan.duplicates, ids, None)
    failed = [(o.source, o.reason or "") for o in plan.duplicates] + plan.failed_before
    skipped = list(plan.skipped_before)
    if progress and len(refs) > len(plan.todo):
        progress(len(refs) - len(plan.todo))
    embedded = 0
    last_checkpoint = time.perf_counter()
    batches = encode_refs(
        plan.todo,
        encoder=encoder,
        batch_size=batch_size,
        num_workers=num_workers,
        loading=Loading(
            max_voxels=max_voxels,
            head_check=not allow_non_head,
            preprocess_device=preprocess_device,
            zip_limits=zip_limits,
        ),
    )
    for outcomes, vectors in batches:
        with store.transaction():
            ids = store_outcomes(collection, outcomes, vectors, patients=patients)
        publish_batch(feed, collection, outcomes, ids, vectors, patients=patients)
        if time.perf_counter() - last_checkpoint >= checkpoint_seconds:
            store.checkpoint()
            last_checkpoint = time.perf_counter()
        embedded += sum(o.status == "embedded" for o in outcomes)
        failed += [(o.source, o.reason or "unknown") for o in outcomes if o.status == "failed"]
        skipped += [(o.source, o.reason or "") for o in outcomes if o.status == "skipped"]
        if progress:
            progress(len(outcomes))
    store.checkpoint()
    refresh_index(collection, index_kind=index_kind)
    return EmbedReport(
        collection.row, len(refs), embedded, plan.unchanged, failed, time.perf_counter() - start, skipped
    )


def store_outcomes(
    collection: Collection,
    outcomes: Sequence[Outcome],
    vectors: np.ndarray | None,
    *,
    patients: dict[str, str] | None = None,
) -> None:
    """Write scans, vectors ``[n_embedded, dim]`` (embedded outcomes, in order) and status rows.

    Call inside a transaction. A failed scan loses any vector stored before (a changed file that no longer
    loads must not keep its old one). Vectors are inserted in ``outcomes`` order, which fixes their ids;
    returns them ``[n_embedded]``.
    """
    patients = patients or {}
    good = [o for o in outcomes if o.status == "embedded"]
    bad = [o for o in outcomes if o.status != "embedded"]
    ids = np.zeros(0, np.int64)
    if good:
        collection.store.scans.upsert(
            [
                ScanRow(
                    scan_id=o.scan_id,
                    patient_id=o.patient_id or patients.get(o.scan_id),
                    format=o.format,
                    meta=o.meta,
                )
                for o in good
            ]
        )
        ids = collection.add(scan_ids=[o.scan_id for o in good], vectors=vectors)
        collection.set_planes([(o.scan_id, o.planes) for o in good if o.planes])
    collection.delete([o.scan_id for o in bad if o.scan_id])
    collection.record_statuses(
        [
            StatusRow(
                source=o.source,
                scan_id=o.scan_id or None,
                status=o.status,
                reason=o.reason,
                file_size=o.file_size,
                file_mtime_ns=o.file_mtime_ns,
            )
            for o in outcomes
        ]
    )
    return ids


def publish_batch(
    feed: LiveFeed | None,
    collection: Collection,
    outcomes: Sequence[Outcome],
    ids: np.ndarray,
    vectors: np.ndarray | None,
    *,
    patients: dict[str, str] | None = None,
) -> None:
    """Tell an attached server (:mod:`hctembed.index.live_feed`) about a batch that has just committed."""
    if feed is None or not feed.attached:
        return
    good = [o for o in outcomes if o.status == "embedded"]
    labels = collection.store.labels.of([o.scan_id for o in good])
    feed.publish(
        collection_id=collection.collection_id,
        model_id=collection.model_id,
        fingerprint=collection.fingerprint,
        ids=ids,
        scan_ids=[o.scan_id for o in good],
        vectors=vectors if vectors is not None else np.zeros((0, collection.dim), np.float32),
        patients=[o.patient_id or (patients or {}).get(o.scan_id) for o in good],
        labels=[labels.get(o.scan_id, {}) for o in good],
        planes=[o.planes for o in good],
        deleted=[o.scan_id for o in outcomes if o.status != "embedded" and o.scan_id],
    )


def refuse_other_archives(store: Store, scans: Sequence[tuple[str, str]]) -> None:
    """Two archives with the same relative file names would overwrite each other's scans: refuse.

    ``scans``: ``(scan_id, archive_root)`` pairs about to be stored. (Series from a PACS are left out: their ids
    are pseudonyms of globally unique UIDs, so the same id from another address is the same series, moved.)
    """
    stored = {s: where.root for s, where in store.locations([scan_id for scan_id, _ in scans]).items()}
    clashes = [(scan_id, stored[scan_id], root) for scan_id, root in scans if stored.get(scan_id, root) != root]
    if clashes:
        scan_id, old, new = clashes[0]
        raise StoreError(
            f"{len(clashes)} scan ids of {new} are already stored from {old} (e.g. {scan_id}); "
            "embed this archive into another --db, or give its files other names"
        )


def refresh_index(collection: Collection, *, index_kind: str | None = None) -> VectorIndex:
    """Bring the collection's FAISS index in line with DuckDB (rebuilt only when it differs).

    ``index_kind`` (exact | hnsw | ivf | ivfpq | auto) picks the index; ``None`` keeps the saved one's kind.
    """
    options = IndexOptions(kind=index_kind) if index_kind else None
    return open_index(collection, quiet=True, options=options)
