"""Embedding on many ranks (``torchrun ... embed --distributed``) and merging their Parquet parts into a database.

Each rank embeds every WORLD_SIZE-th scan into parts under the shard folder (see :mod:`hctembed.embedding.shards`);
rank 0 reads the headers once beforehand and merges the parts into the database afterwards. torch.distributed
(gloo) carries only barriers and the ranks' small reports; no scheduler of our own.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from hctembed.io.labels import LabelTable
from hctembed.workflows.embed import (
    EmbedRequest,
    EmbedSummary,
    InputError,
    check_request_inputs,
    disk_use,
    find_scans,
    hand_over_to_server,
    import_labels,
    labels_of,
    load_request_encoder,
    preprocess_device_for,
    skipped_on_loading,
)
from hctembed.workflows.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeRequest:
    """What ``hctembed merge-shards`` is asked to do."""

    shards: Path
    db: Path
    labels: Path | None = None
    index: str | None = None
    keep_parts: bool = False

    def __post_init__(self) -> None:
        from hctembed.index.choice import KINDS

        if self.index is not None and self.index not in KINDS:
            raise InputError(f"--index must be one of {', '.join(KINDS)}, not {self.index!r}")


def _merge_into(request: MergeRequest, *, table: LabelTable | None, origin: str | None, progress: Progress):
    """Labels, then the parts into the database; returns the MergeReport and the collection's status rows."""
    from hctembed.embedding.parts import part_rows
    from hctembed.embedding.shards import merge_shards
    from hctembed.index.live_feed import LiveFeed
    from hctembed.index.store import Store

    with Store(request.db) as store:
        import_labels(store, table, origin)
        feed = LiveFeed(store.paths.live, like=store.path)
        with progress.task("merging parts", total=part_rows(request.shards)) as advance:
            merged = merge_shards(
                folder=request.shards,
                store=store,
                patients=table.patients() if table else None,
                index_kind=request.index,
                keep_parts=request.keep_parts,
                progress=advance,
                feed=feed,
            )
        if table is not None:
            store.scans.set_patients(table.patients())
        hand_over_to_server(store, feed)
        collection = store.collection(model_id=merged.collection.model_id, fingerprint=merged.collection.fingerprint)
        return merged, collection.status()


def run_merge(request: MergeRequest, *, progress: Progress = NO_PROGRESS) -> EmbedSummary:
    """Store the parts of a sharded run in the database and build the index (rank 0's last step)."""
    from hctembed.embedding.shards import read_run_info
    from hctembed.io.labels import read_labels

    read_run_info(request.shards)  # not a shard folder: say so before a database is created
    table = read_labels(request.labels) if request.labels else None
    origin = request.labels.name if request.labels else None
    merged, status = _merge_into(request, table=table, origin=origin, progress=progress)
    failed = sorted((source, row.reason or "") for source, row in status.items() if row.status == "failed")
    return EmbedSummary(
        db=request.db,
        model_id=merged.collection.model_id,
        fingerprint=merged.collection.fingerprint,
        scans=merged.embedded + merged.unchanged + len(failed),
        embedded=merged.embedded,
        unchanged=merged.unchanged,
        failed=failed,
        skipped=[],
        seconds=merged.seconds,
        extra={"parts": merged.parts},
        written=disk_use(request.db),
    )


def _prepare_rank0(request: EmbedRequest, *, shards: Path, progress: Progress) -> None:
    """Rank 0 before the others start: headers read once into a manifest, and old parts merged first."""
    from hctembed.io.manifest import write_manifest

    shards.mkdir(parents=True, exist_ok=True)
    source = request.source()
    if source.kind != "manifest":  # the other ranks read this manifest
        found = find_scans(source, request.find_options(), progress=progress)
        write_manifest(found, shards / "manifest.parquet")


def _merge_stale_and_write_run_info(request: EmbedRequest, encoder, *, shards: Path, world: int, found) -> None:
    from hctembed.embedding.shards import merge_shards, run_key, stale_parts, write_run_info
    from hctembed.index.store import Store

    stale = stale_parts(shards, key=run_key(encoder=encoder, refs=found.selected, world=world))
    if request.db.exists() or stale:
        with Store(request.db) as store:  # migrates an older schema before the ranks open it read-only
            if stale:  # parts of an earlier, different run (other files, model or world size): keep their work
                log.info("merging the parts an earlier run left in %s first", shards)
                merge_shards(folder=shards, store=store)
    from hctembed.io.locator import locator_path

    manifest = Path(request.archive) if request.source().kind == "manifest" else shards / "manifest.parquet"
    write_run_info(
        shards, encoder=encoder, world=world, refs=found.selected, skipped=found.skipped,
        locator=locator_path(manifest),
    )  # fmt: skip
    log.info(
        "%d scans selected, %d skipped in %s; %d ranks; model %s, preprocessing %s; parts under %s",
        len(found.selected), len(found.skipped), request.archive, world, encoder.model_id, encoder.fingerprint,
        shards,
    )  # fmt: skip


def _stored_status(request: EmbedRequest, encoder, refs) -> dict:
    """What the database already holds for this model (read-only, by every rank at once)."""
    from hctembed.embedding.run import refuse_other_archives
    from hctembed.index.store import ModelMismatchError, Store

    if not request.db.exists():
        return {}
    with Store(request.db, read_only=True) as store:
        refuse_other_archives(store, [(r.scan_id, r.located().root) for r in refs if r.remote is None])
        try:
            return store.collection(model_id=encoder.model_id, fingerprint=encoder.fingerprint).status()
        except ModelMismatchError:
            return {}  # this model has no vectors in the database yet


def run_embed_distributed(
    request: EmbedRequest, *, shards: Path | None = None, progress: Progress = NO_PROGRESS
) -> EmbedSummary | None:
    """One rank of a sharded embed; rank 0 returns the run's summary after merging, the others ``None``."""
    import torch

    from hctembed import distributed as ddp
    from hctembed.embedding.shards import embed_shard
    from hctembed.index.store import SidecarPaths
    from hctembed.io.manifest import read_manifest

    start = time.perf_counter()
    check_request_inputs(request)
    shards = shards or SidecarPaths(request.db).shards
    # gloo carries only barriers (no tensors), on CPU and GPU hosts alike; the slowest rank may take hours
    ddp.init_from_env(use_cuda=False, backend="gloo", timeout=timedelta(days=3))
    rank, world = ddp.rank_world()
    progress = progress if rank == 0 else NO_PROGRESS
    if world == 1:
        log.info("--distributed without torchrun (WORLD_SIZE unset): one rank embeds everything")
    device = request.device
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    if rank == 0:
        _prepare_rank0(request, shards=shards, progress=progress)
    ddp.barrier()
    given = request.source()
    found = read_manifest(
        Path(request.archive) if given.kind == "manifest" else shards / "manifest.parquet", auth_file=request.auth_file
    )  # a PACS's series are fetched with the run's credentials
    refs = found.selected  # every rank, rank 0 included: the same refs in the same order
    encoder = load_request_encoder(request, device=device)
    if rank == 0:
        _merge_stale_and_write_run_info(request, encoder, shards=shards, world=world, found=found)
    ddp.barrier()  # rank 0 has closed the database it may have migrated or merged into
    stored = _stored_status(request, encoder, refs)
    with progress.task(f"embedding (rank {rank} of {world})", total=(len(refs) - rank + world - 1) // world) as advance:
        shard = embed_shard(
            refs=refs, encoder=encoder, folder=shards, rank=rank, world=world, stored=stored,
            batch_size=request.batch_size, num_workers=request.workers, retry_failed=request.retry_failed,
            progress=advance, max_voxels=request.max_voxels, allow_non_head=request.allow_non_head,
            zip_limits=request.zip_limits,
            preprocess_device=preprocess_device_for(request, encoder),
        )  # fmt: skip
    reports = ddp.all_gather_objects(shard)
    summary = None
    if rank == 0:
        table, origin = labels_of(given, request.labels, locations=found.locations())
        merge = MergeRequest(shards=shards, db=request.db, index=request.index)
        merged, status = _merge_into(merge, table=table, origin=origin, progress=progress)
        failed = [
            (r.source, row.reason or "") for r in refs if (row := status.get(r.source)) and row.status == "failed"
        ]
        not_selected = [
            (r.source, row.reason or "") for r in refs if (row := status.get(r.source)) and row.status == "skipped"
        ]
        summary = EmbedSummary(
            db=request.db,
            model_id=merged.collection.model_id,
            fingerprint=merged.collection.fingerprint,
            scans=len(refs),
            embedded=merged.embedded,
            unchanged=len(refs) - merged.embedded - len(failed) - len(not_selected),
            failed=failed,
            skipped=list(found.skipped) + skipped_on_loading(refs, not_selected),
            seconds=time.perf_counter() - start,
            written=disk_use(request.db),
            extra={
                "ranks": world,
                "rank_seconds": [round(r.seconds, 2) for r in reports],
                "merge_seconds": round(merged.seconds, 2),
            },
        )
    ddp.barrier()
    ddp.shutdown()
    return summary
