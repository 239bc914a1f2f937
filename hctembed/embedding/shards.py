"""Sharded embedding for torchrun: every rank embeds its share of an archive into Parquet files, then one
merge step stores them in DuckDB and builds the FAISS index.

DuckDB has one writer per file, so ranks never open the database for writing: each reads the stored
status once (read-only, to skip scans already embedded), embeds the refs at positions ``rank, rank +
world, ...`` of the run's list, and writes its outcomes - vectors, scan metadata, failures with reasons -
as Parquet parts under ``shards/parts/``. Each part is written under a temporary name and renamed, so a
killed rank leaves only whole parts, and a re-run skips what the parts already hold. The merge
(:func:`merge_shards`, run by rank 0 after a barrier, or by ``hctembed merge-shards``) stores the outcomes
in the order of the run's list, so the database - vectors and their int64 ids - is the one a single
process would have written. Parts are removed once merged; a repeated merge changes nothing.

Layout of a shard folder::

    run.json                 the encoder (model id, weights, preprocessing), world size, skipped candidates
    manifest.parquet         the archive's refs (when rank 0 scanned a folder; else the given manifest)
    parts/rank0000-000001.parquet ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hctembed.embedding.loading import Loading
from hctembed.embedding.parts import PartWriter, done_in_parts, part_files, read_parts
from hctembed.embedding.run import (
    Outcome,
    encode_refs,
    needs_embedding,
    plan_run,
    publish_batch,
    record_skipped,
    refresh_index,
    refuse_other_archives,
    store_outcomes,
)
from hctembed.errors import HctembedError
from hctembed.index.live_feed import LiveFeed
from hctembed.index.store import CollectionRow, ModelRow, StatusRow, Store
from hctembed.io.admission import Limits
from hctembed.io.archive import SeriesRef, Skipped
from hctembed.io.locator import Location, Locator
from hctembed.model.encoders import Encoder
from hctembed.volume import MAX_VOXELS

log = logging.getLogger(__name__)

RUN_FILE = "run.json"


class ShardError(HctembedError, RuntimeError):
    """A shard folder that cannot be merged into this database; the message says why."""


@dataclass(frozen=True)
class ShardReport:
    """What one rank did: scans assigned to it, embedded now, failed now, and found already done."""

    rank: int
    world: int
    assigned: int
    embedded: int
    failed: int
    already_done: int
    seconds: float


@dataclass(frozen=True)
class MergeReport:
    collection: CollectionRow
    parts: int
    embedded: int
    failed: int
    unchanged: int
    seconds: float


def assigned(refs: Sequence[SeriesRef], *, rank: int, world: int) -> list[tuple[int, SeriesRef]]:
    """The refs rank ``rank`` of ``world`` embeds, with their positions in ``refs``: every world-th one."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return [(i, ref) for i, ref in enumerate(refs) if i % world == rank]


def run_key(*, encoder: Encoder, refs: Sequence[SeriesRef], world: int) -> str:
    """What makes parts resumable: the model, its preprocessing, the world size and the ordered refs (with
    their file sizes and times). Parts written under another key belong to another run."""
    digest = hashlib.sha256(f"{encoder.model_id}|{encoder.fingerprint}|{world}".encode())
    for ref in refs:
        digest.update(f"\n{ref.source}|{ref.scan_id}|{ref.size}|{ref.mtime_ns}".encode())
    return digest.hexdigest()


def stale_parts(folder: Path, *, key: str) -> bool:
    """Whether ``folder`` holds unmerged parts of another run (merge them before starting this one)."""
    if not part_files(folder):
        return False
    return read_run_info(folder).get("run_key") != key


def write_run_info(
    folder: Path,
    *,
    encoder: Encoder,
    world: int,
    refs: Sequence[SeriesRef],
    skipped: Sequence[Skipped],
    locator: Path | None = None,
) -> str:
    """Record the run (rank 0, before any rank embeds): what the merge needs without loading the model.

    ``locator``: the manifest's locator, whose entries the merge copies to the database's (the run file
    holds no path of the archive itself).

    Returns the run key. Refuses (ShardError) while unmerged parts of another run are in the folder: their
    positions refer to another list of scans, so they must be merged first (:func:`merge_shards`).
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = run_key(encoder=encoder, refs=refs, world=world)
    if stale_parts(folder, key=key):
        raise ShardError(
            f"{folder} holds unmerged parts of another run; merge them first "
            f"(hctembed merge-shards {folder} --db ...) or use another --shards folder"
        )
    info = {
        "run_key": key,
        "model_id": encoder.model_id,
        "name": encoder.name,
        "dim": encoder.dim,
        "config": encoder.model.config.to_dict(),
        "weights_path": encoder.weights_path,
        "weights_digest": encoder.weights_digest,
        "card": encoder.card,
        "fingerprint": encoder.fingerprint,
        "preprocess": asdict(encoder.preprocess),
        "world": world,
        "scans": len(refs),
        "skipped": [s.public() for s in skipped],
        "locator": str(locator.resolve()) if locator else None,
    }
    tmp = folder / f".{RUN_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=1, default=str))
    os.replace(tmp, folder / RUN_FILE)
    return key


def read_run_info(folder: Path) -> dict[str, Any]:
    path = folder / RUN_FILE
    if not path.exists():
        raise ShardError(f"{folder} is not a shard folder (no {RUN_FILE}); run `embed --distributed` first")
    return json.loads(path.read_text())


def embed_shard(
    *,
    refs: Sequence[SeriesRef],
    encoder: Encoder,
    folder: Path,
    rank: int,
    world: int,
    stored: dict[str, StatusRow] | None = None,
    batch_size: int = 2,
    num_workers: int = 1,
    retry_failed: bool = False,
    rows_per_part: int = 256,
    progress: Callable[[int], None] | None = None,
    max_voxels: int = MAX_VOXELS,
    zip_limits: Limits | None = None,
    allow_non_head: bool = False,
    preprocess_device: str | None = None,
) -> ShardReport:
    """Embed this rank's share of ``refs`` into Parquet parts under ``folder``.

    ``stored`` is the database's status (``{source: StatusRow}``, read by the caller) so that scans
    embedded by an earlier run are skipped as :func:`hctembed.embedding.run.embed_archive` would; outcomes already
    in the folder's parts (a re-run after a killed rank) are skipped too. The split by rank is over the
    positions in ``refs`` and so does not depend on what is done: every rank computes the same one.
    """
    start = time.perf_counter()
    plan = plan_run(refs, stored or {}, retry_failed=retry_failed, retry_skipped=allow_non_head)
    in_parts = done_in_parts(folder)
    mine = {position for position, _ in assigned(refs, rank=rank, world=world)}
    todo = [
        (p, ref)
        for p, ref in plan.todo
        if p in mine
        and needs_embedding(ref, in_parts.get(ref.source), retry_failed=retry_failed, retry_skipped=allow_non_head)
    ]
    writer = PartWriter(folder, rank=rank, dim=encoder.dim, rows_per_part=rows_per_part)
    duplicates = [o for o in plan.duplicates if o.position in mine and o.source not in in_parts]
    writer.add(duplicates, np.zeros((0, encoder.dim), np.float32))
    n_mine = len(mine)
    already = n_mine - len(todo) - len(duplicates)  # embedded before, in the database or in parts
    if progress and n_mine > len(todo):
        progress(n_mine - len(todo))
    embedded = failed = 0
    batches = encode_refs(
        todo,
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
        writer.add(outcomes, vectors)
        embedded += len(vectors)
        failed += len(outcomes) - len(vectors)
        if progress:
            progress(len(outcomes))
    writer.flush()
    return ShardReport(rank, world, n_mine, embedded, failed + len(duplicates), already, time.perf_counter() - start)


def _run_locations(info: dict[str, Any]) -> dict[str, Location]:
    """The entries of the run's manifest locator (empty when the run has none, or it is gone: the merge then
    stores the vectors without recording where their files lie)."""
    where = info.get("locator")
    if not where or not Path(where).exists():
        if where:
            log.warning("the run's locator %s is gone: the merged scans' files will not be found again", where)
        return {}
    with Locator(Path(where), read_only=True) as locator:
        return {e.key: e for e in locator.all()}


def _already_stored(o: Outcome, row: StatusRow | None) -> bool:
    """Leave an outcome out of the merge when the database already has what it would write, or better:
    the same file (size, mtime) embedded, the same failure, or a newer version of the file."""
    if row is None:
        return False
    same_file = (row.file_size, row.file_mtime_ns) == (o.file_size, o.file_mtime_ns)
    if same_file and (row.status == "embedded" or (row.status, row.reason) == (o.status, o.reason)):
        return True
    return row.file_mtime_ns is not None and row.file_mtime_ns > o.file_mtime_ns


def merge_shards(
    *,
    folder: Path,
    store: Store,
    patients: dict[str, str] | None = None,
    index_kind: str | None = None,
    keep_parts: bool = False,
    progress: Callable[[int], None] | None = None,
    feed: LiveFeed | None = None,
) -> MergeReport:
    """Store every outcome in the folder's parts (in run order), record skipped candidates, build the index.

    Outcomes whose files the database already holds as embedded (same size and mtime) are left alone, so a
    repeated or interrupted merge is idempotent. Parts are deleted after the merge unless ``keep_parts``.
    """
    start = time.perf_counter()
    info = read_run_info(folder)
    store.models.register(
        ModelRow(
            model_id=info["model_id"],
            name=info["name"],
            dim=info["dim"],
            config=info["config"],
            weights_path=info["weights_path"],
            weights_digest=info["weights_digest"],
            card=info["card"] or {},
        )
    )
    collection = store.collection(
        model_id=info["model_id"], fingerprint=info["fingerprint"], dim=info["dim"], preprocess=info["preprocess"]
    )
    stored = collection.status()  # each source occurs once in the parts: one read serves the whole merge
    record_skipped(collection, [Skipped(**s) for s in info.get("skipped", [])], known=stored)
    located = _run_locations(info)
    parts = part_files(folder)
    embedded = failed = unchanged = 0
    for outcomes, vectors in read_parts(folder, dim=collection.dim):
        # before anything is skipped as "already stored": the status table knows files by relative name only
        embedded_here = [o.scan_id for o in outcomes if o.status == "embedded" and o.scan_id in located]
        refuse_other_archives(store, [(s, located[s].root) for s in embedded_here])
        it = iter(vectors)
        keep, keep_vec = [], []
        for o in outcomes:
            v = next(it) if o.status == "embedded" else None
            if _already_stored(o, stored.get(o.source)):
                unchanged += 1
                continue
            keep.append(o)
            if v is not None:
                keep_vec.append(v)
        kept = np.stack(keep_vec) if keep_vec else np.zeros((0, collection.dim), np.float32)
        with store.transaction():
            ids = store_outcomes(collection, keep, kept, patients=patients)
        publish_batch(feed, collection, keep, ids, kept, patients=patients)
        embedded += len(keep_vec)
        failed += len(keep) - len(keep_vec)
        if progress:
            progress(len(outcomes))
    store.record_locations(list(located.values()))
    store.checkpoint()
    refresh_index(collection, index_kind=index_kind)
    if not keep_parts:
        for path in parts:
            path.unlink(missing_ok=True)
    return MergeReport(collection.row, len(parts), embedded, failed, unchanged, time.perf_counter() - start)
