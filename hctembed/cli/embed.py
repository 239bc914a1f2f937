"""``hctembed embed``: embed every scan of an archive into a DuckDB file and its FAISS index."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import print_json_lines, print_table, progress_bar, setup_logging, stderr


def embed(
    archive: Path = typer.Argument(
        ...,
        help="A folder (searched recursively for NIfTI files, DICOM series and zips of DICOM), one NIfTI/DICOM/"
        "zip file, or a manifest.parquet written by `hctembed scan`.",
    ),
    db: Path = typer.Option(..., "--db", help="DuckDB file (created if missing)."),
    model: str = typer.Option("vit-base", "--model", help="Encoder architecture (vit-base, vit-small, ...)."),
    weights: Path | None = typer.Option(None, "--weights", help="safetensors encoder; random init if omitted."),
    seed: int = typer.Option(0, "--seed", help="Seed for a random-initialised encoder."),
    random_init: bool = typer.Option(
        False, "--random-init", help="Merlin / CT-FM: random weights instead of the released ones (tests, timing)."
    ),
    labels: Path | None = typer.Option(
        None, "--labels", help="labels.csv to import (default: ARCHIVE/labels.csv when present)."
    ),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Try scans that failed before even if their files did not change."
    ),
    workers: int = typer.Option(1, "--workers", min=0, help="DataLoader worker processes (0 = in-process)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads for the encoder."),
    secret: Path | None = typer.Option(
        None, "--secret", help="Pseudonym secret file (default: $HCTEMBED_SECRET or ~/.config/hctembed/secret.key)."
    ),
    index: str | None = typer.Option(
        None,
        "--index",
        help="FAISS index: exact, hnsw, ivf, ivfpq (re-ranked exactly) or auto (exact until an approximate index "
        "holds recall@10 >= 0.99 faster). Default: keep the saved index's kind (exact for a new one).",
    ),
    checkpoint_seconds: float = typer.Option(
        30.0,
        "--checkpoint-seconds",
        min=0,
        help="Fold DuckDB's write-ahead log into the file at most this often (each batch is committed anyway).",
    ),
    device: str = typer.Option(
        "auto", "--device", help="Where the encoder runs: auto (CUDA when present), cpu, cuda, cuda:N."
    ),
    distributed: bool = typer.Option(
        False,
        "--distributed",
        help="Under torchrun: each rank embeds every WORLD_SIZE-th scan into Parquet parts under --shards, then "
        "rank 0 merges them into --db and builds the index.",
    ),
    shards: Path | None = typer.Option(
        None, "--shards", help="Shard folder for --distributed (default: DB.shards); must be shared by all ranks."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as a JSON line."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Embed an archive; re-runs skip scans already embedded with the same model and preprocessing."""
    import torch

    from hctembed.index.choice import KINDS

    setup_logging(quiet=quiet)
    if index is not None and index not in KINDS:
        raise typer.BadParameter(f"--index must be one of {', '.join(KINDS)}, not {index!r}")
    if threads:
        torch.set_num_threads(threads)
    run = dict(
        archive=archive,
        db=db,
        model=model,
        weights=weights,
        seed=seed,
        random_init=random_init,
        labels=labels,
        batch_size=batch_size,
        retry_failed=retry_failed,
        workers=workers,
        secret=secret,
        index=index,
        device=device,
        as_json=as_json,
        quiet=quiet,
    )
    if distributed:
        _embed_distributed(**run, shards=shards or Path(str(db) + ".shards"))
    else:
        _embed_here(**run, checkpoint_seconds=checkpoint_seconds)


def _find(archive: Path, *, secret: Path | None, quiet: bool):
    """The archive's candidates: read from a manifest, or found by reading headers."""
    from hctembed.io.archive import scan_archive
    from hctembed.io.manifest import is_manifest, read_manifest
    from hctembed.io.pseudonym import Pseudonymizer

    if is_manifest(archive):
        return read_manifest(archive)
    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("reading headers", total=None)
        return scan_archive(
            archive,
            pseudonyms=Pseudonymizer.from_file(secret) if secret else None,
            progress=lambda k: bar.update(task, completed=k),
        )


def _labels_of(archive: Path, labels: Path | None):
    from hctembed.io.labels import read_labels

    if labels is None and archive.is_dir() and (archive / "labels.csv").exists():
        labels = archive / "labels.csv"
    return (read_labels(labels), labels.name) if labels else (None, None)


def _import_labels(store, table, origin: str | None) -> None:
    if table is None:
        return
    store.set_labels(
        (
            (s, name, v)
            for s, row in zip(table.scan_ids, table.values, strict=True)
            for name, v in zip(table.names, row, strict=True)
            if v == v
        ),
        origin=str(origin),
    )


def _encoder(*, model, weights, seed, random_init, device):
    import torch

    from hctembed.model.encoders import load_encoder

    encoder = load_encoder(model, weights=weights, seed=seed, random_init=random_init or None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: torch sees no CUDA device")
    return encoder.to(device)


def _embed_here(
    *, archive, db, model, weights, seed, random_init, labels, batch_size, retry_failed, workers, secret, index,
    device, as_json, quiet, checkpoint_seconds,
) -> None:  # fmt: skip
    from hctembed.embed import embed_archive
    from hctembed.index.store import Store

    found = _find(archive, secret=secret, quiet=quiet)
    refs = found.selected
    table, origin = _labels_of(archive, labels)
    encoder = _encoder(model=model, weights=weights, seed=seed, random_init=random_init, device=device)
    stderr.print(
        f"{len(refs)} scans selected, {len(found.skipped)} skipped in {archive}; "
        f"model {encoder.model_id}, preprocessing {encoder.fingerprint}"
    )
    with Store(db) as store:
        _import_labels(store, table, origin)
        with progress_bar(quiet=quiet) as bar:
            task = bar.add_task("embedding", total=len(refs))
            report = embed_archive(
                refs=refs,
                encoder=encoder,
                store=store,
                batch_size=batch_size,
                num_workers=workers,
                patients=table.patients() if table else None,
                skipped=found.skipped,
                retry_failed=retry_failed,
                progress=lambda k: bar.advance(task, k),
                index_kind=index,
                checkpoint_seconds=checkpoint_seconds,
            )
        if table is not None:
            store.set_patients(table.patients())
    summary = {
        "db": str(db),
        "model_id": report.collection.model_id,
        "fingerprint": report.collection.fingerprint,
        "scans": report.total,
        "embedded": report.embedded,
        "unchanged": report.unchanged,
        "failed": len(report.failed),
        "skipped": len(found.skipped),
        "seconds": round(report.seconds, 2),
    }
    _print_summary(summary, report.failed, found.skipped, as_json=as_json)


def _print_summary(summary: dict, failed, skipped, *, as_json: bool) -> None:
    if as_json:
        print_json_lines(
            [
                summary
                | {"failures": [{"source": s, "reason": r} for s, r in failed]}
                | {"skips": [{"source": k.source, "code": k.reason_code, "reason": k.reason} for k in skipped]}
            ]
        )
        return
    print_table([{"field": k, "value": v} for k, v in summary.items()], title="embed")
    if failed:
        print_table([{"source": s, "reason": r} for s, r in failed], title="scans that failed to load")
    if skipped:
        print_table(
            [{"source": k.source, "code": k.reason_code, "reason": k.reason} for k in skipped],
            title="candidates not selected",
        )


def _embed_distributed(
    *, archive, db, model, weights, seed, random_init, labels, batch_size, retry_failed, workers, secret, index,
    device, as_json, quiet, shards,
) -> None:  # fmt: skip
    """One rank of ``torchrun ... -m hctembed.cli embed --distributed``: see :mod:`hctembed.embed_shards`."""
    import os
    import time
    from datetime import timedelta

    import torch

    from hctembed import distributed as ddp
    from hctembed.embed import refuse_other_archives
    from hctembed.embed_shards import embed_shard, merge_shards, run_key, stale_parts, write_run_info
    from hctembed.index.store import ModelMismatchError, Store
    from hctembed.io.manifest import is_manifest, manifest_rows, read_manifest, write_manifest
    from hctembed.model.encoders import persist_weights

    start = time.perf_counter()
    # gloo carries only barriers (no tensors), on CPU and GPU hosts alike; the slowest rank may take hours
    ddp.init_from_env(use_cuda=False, backend="gloo", timeout=timedelta(days=3))
    rank, world = ddp.rank_world()
    quiet = quiet or rank != 0
    if world == 1:
        stderr.print("--distributed without torchrun (WORLD_SIZE unset): one rank embeds everything")
    if device == "auto" and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    manifest = archive if is_manifest(archive) else shards / "manifest.parquet"
    if rank == 0:
        shards.mkdir(parents=True, exist_ok=True)
        if not is_manifest(archive):  # headers are read once, by rank 0; the others read its manifest
            found = _find(archive, secret=secret, quiet=quiet)
            root = archive.resolve() if archive.is_dir() else archive.resolve().parent
            write_manifest(manifest_rows(found, root=root), manifest)
    ddp.barrier()
    found = read_manifest(manifest)  # every rank, rank 0 included: the same refs in the same order
    refs = found.selected
    encoder = _encoder(model=model, weights=weights, seed=seed, random_init=random_init, device=device)
    if rank == 0:
        encoder = persist_weights(encoder, folder=Path(str(db) + ".models"))
        stale = stale_parts(shards, key=run_key(encoder=encoder, refs=refs, world=world))
        if db.exists() or stale:
            with Store(db) as store:  # migrates an older schema before the ranks open it read-only
                if stale:
                    # parts of an earlier, different run (other files, model or world size): keep their work
                    stderr.print(f"merging the parts an earlier run left in {shards} first")
                    merge_shards(folder=shards, store=store)
        write_run_info(shards, encoder=encoder, world=world, refs=refs, skipped=found.skipped)
        stderr.print(
            f"{len(refs)} scans selected, {len(found.skipped)} skipped in {archive}; {world} ranks; "
            f"model {encoder.model_id}, preprocessing {encoder.fingerprint}; parts under {shards}"
        )
    ddp.barrier()  # rank 0 has closed the database it may have migrated or merged into
    stored = {}
    if db.exists():  # read-only, by every rank at once; nobody writes until the merge
        with Store(db, read_only=True) as store:
            refuse_other_archives(store, [(r.scan_id, str(r.root)) for r in refs])
            try:
                stored = store.status(store.collection(model_id=encoder.model_id, fingerprint=encoder.fingerprint))
            except ModelMismatchError:
                stored = {}  # this model has no vectors in the database yet
    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task(f"embedding (rank {rank} of {world})", total=(len(refs) - rank + world - 1) // world)
        shard = embed_shard(
            refs=refs,
            encoder=encoder,
            folder=shards,
            rank=rank,
            world=world,
            stored=stored,
            batch_size=batch_size,
            num_workers=workers,
            retry_failed=retry_failed,
            progress=lambda k: bar.advance(task, k),
        )
    reports = ddp.all_gather_objects(shard)
    if rank == 0:
        table, origin = _labels_of(archive, labels)
        merged, status = _merge(shards, db=db, table=table, origin=origin, index=index, keep_parts=False, quiet=quiet)
        failed = [(r.source, row.reason) for r in refs if (row := status.get(r.source)) and row.status == "failed"]
        summary = {
            "db": str(db),
            "model_id": merged.collection.model_id,
            "fingerprint": merged.collection.fingerprint,
            "ranks": world,
            "scans": len(refs),
            "embedded": merged.embedded,
            "unchanged": len(refs) - merged.embedded - len(failed),
            "failed": len(failed),
            "skipped": len(found.skipped),
            "seconds": round(time.perf_counter() - start, 2),
            "rank_seconds": [round(r.seconds, 2) for r in reports],
            "merge_seconds": round(merged.seconds, 2),
        }
        _print_summary(summary, failed, found.skipped, as_json=as_json)
    ddp.barrier()
    ddp.shutdown()


def merge_shards_command(
    shards: Path = typer.Argument(..., help="Shard folder written by `embed --distributed` (its run.json, parts/)."),
    db: Path = typer.Option(..., "--db", help="DuckDB file (created if missing)."),
    labels: Path | None = typer.Option(None, "--labels", help="labels.csv to import."),
    index: str | None = typer.Option(None, "--index", help="FAISS index kind (see `embed --index`)."),
    keep_parts: bool = typer.Option(False, "--keep-parts", help="Keep the Parquet parts after merging."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as a JSON line."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Store the Parquet parts of a sharded run in DuckDB and build the index (what rank 0 does at the end of
    `embed --distributed`; for a merge that was interrupted, or parts copied from elsewhere)."""
    from hctembed.embed_shards import read_run_info
    from hctembed.index.choice import KINDS
    from hctembed.io.labels import read_labels

    setup_logging(quiet=quiet)
    if index is not None and index not in KINDS:
        raise typer.BadParameter(f"--index must be one of {', '.join(KINDS)}, not {index!r}")
    read_run_info(shards)  # not a shard folder: say so before a database is created
    table = read_labels(labels) if labels else None
    origin = labels.name if labels else None
    merged, status = _merge(shards, db=db, table=table, origin=origin, index=index, keep_parts=keep_parts, quiet=quiet)
    failed = sorted((source, row.reason) for source, row in status.items() if row.status == "failed")
    summary = {
        "db": str(db),
        "model_id": merged.collection.model_id,
        "fingerprint": merged.collection.fingerprint,
        "parts": merged.parts,
        "embedded": merged.embedded,
        "unchanged": merged.unchanged,
        "failed": len(failed),
        "seconds": round(merged.seconds, 2),
    }
    _print_summary(summary, failed, [], as_json=as_json)


def _merge(shards: Path, *, db: Path, table, origin, index, keep_parts: bool, quiet: bool):
    """Labels, then the parts into ``db`` (with a progress bar); returns the MergeReport and the status rows."""
    from hctembed.embed_shards import merge_shards, part_rows
    from hctembed.index.store import Store

    with Store(db) as store:
        _import_labels(store, table, origin)
        with progress_bar(quiet=quiet) as bar:
            task = bar.add_task("merging parts", total=part_rows(shards))
            merged = merge_shards(
                folder=shards,
                store=store,
                patients=table.patients() if table else None,
                index_kind=index,
                keep_parts=keep_parts,
                progress=lambda k: bar.advance(task, k),
            )
        if table is not None:
            store.set_patients(table.patients())
        return merged, store.status(merged.collection)
