"""``hctembed embed``: embed every scan of an archive into a DuckDB file and its FAISS index."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from hctembed.cli.common import (
    ARCHITECTURES,
    BarProgress,
    human_bytes,
    print_json_lines,
    print_table,
    setup_logging,
    stderr,
)
from hctembed.cli.dicomweb_options import ARCHIVE_HELP, AUTH_FILE, FILTERS, SINCE
from hctembed.cli.zip_options import MAX_INFLATE_RATIO, MAX_ZIP_GB, MAX_ZIP_MEMBERS
from hctembed.volume import MAX_VOXELS


def embed(
    archive: str = typer.Argument(..., help=ARCHIVE_HELP),
    db: Path = typer.Option(..., "--db", help="DuckDB file (created if missing)."),
    model: str = typer.Option("vit-base", "--model", help=f"Encoder architecture: {ARCHITECTURES}."),
    weights: Path | None = typer.Option(
        None, "--weights", help="Encoder weights (.safetensors); without them a ViT is random-initialised (a warning)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for a random-initialised encoder."),
    random_init: bool = typer.Option(
        False,
        "--random-init",
        help="Random weights on purpose (tests, timing): a ViT without --weights always is; merlin / ct-fm only "
        "with this flag (else their released weights are required).",
    ),
    labels: Path | None = typer.Option(
        None, "--labels", help="labels.csv to import (default: ARCHIVE/labels.csv when present)."
    ),
    batch_size: int = typer.Option(2, "--batch-size", min=1, help="Scans per encoder call."),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Try scans that failed before even if their files did not change."
    ),
    workers: int = typer.Option(1, "--workers", min=0, help="DataLoader worker processes (0 = in-process)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="torch threads for the encoder."),
    secret: Path | None = typer.Option(
        None, "--secret", help="Pseudonym secret file (default: $HCTEMBED_SECRET or ~/.config/hctembed/secret.key)."
    ),
    allow_non_head: bool = typer.Option(
        False,
        "--allow-non-head",
        help="Embed scans whose header (body part, descriptions, field of view) or image (no skull ring around "
        "brain) says they are not head CT; they are otherwise skipped as not_head. Also retries those skipped so.",
    ),
    pseudonymise_files: bool = typer.Option(
        False,
        "--pseudonymise-files",
        help="Name NIfTI scans by keyed pseudonyms of their paths (fi-...) instead of the paths (DICOM series and "
        "skipped files always are); a labels CSV keyed by file name or stem still joins.",
    ),
    index: str | None = typer.Option(
        None,
        "--index",
        help="FAISS index: exact, hnsw, ivf, ivfpq (re-ranked exactly) or auto (exact until an approximate index "
        "holds recall@10 >= 0.99 faster). Default: keep the saved index's kind (auto for a new one).",
    ),
    checkpoint_seconds: float = typer.Option(
        30.0,
        "--checkpoint-seconds",
        min=0,
        help="Fold DuckDB's write-ahead log into the file at most this often (each batch is committed anyway).",
    ),
    max_voxels: int = typer.Option(
        MAX_VOXELS,
        "--max-voxels",
        min=1,
        show_default=False,
        help="A scan whose headers claim more voxels fails with that reason, before anything of that size is read "
        "(default: 1024 x 1024 x 2000).",
    ),
    max_zip_members: int = MAX_ZIP_MEMBERS,
    max_zip_gb: float = MAX_ZIP_GB,
    max_inflate_ratio: float = MAX_INFLATE_RATIO,
    auth_file: Path | None = AUTH_FILE,
    filters: list[str] = FILTERS,
    since: str | None = SINCE,
    follow: bool = typer.Option(
        False, "--follow", help="DICOMweb: keep running, embedding each new series once it is stable (Ctrl-C stops)."
    ),
    poll_seconds: float = typer.Option(30.0, "--poll-seconds", min=0.1, help="--follow: seconds between polls."),
    stable_seconds: float = typer.Option(
        10.0, "--stable-seconds", min=0.0, help="--follow: a series is embedded once no instance arrived for this long."
    ),
    device: str = typer.Option(
        "auto", "--device", help="Where the encoder runs: auto (CUDA when present), cpu, cuda, cuda:N."
    ),
    preprocess_device: str = typer.Option(
        "auto",
        "--preprocess-device",
        help="Where the resample, windows and crop run: cpu (the DataLoader workers), cuda or cuda:N (the workers "
        "only decode), auto (the encoder's GPU when it runs on one, else cpu).",
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Embed an archive; re-runs skip scans already embedded with the same model and preprocessing."""
    import torch

    from hctembed.workflows.embed import EmbedRequest, run_embed
    from hctembed.workflows.shards import run_embed_distributed

    setup_logging(quiet=quiet)
    if threads:
        torch.set_num_threads(threads)
    request = EmbedRequest(
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
        pseudonymise_files=pseudonymise_files,
        allow_non_head=allow_non_head,
        index=index,
        device=device,
        preprocess_device=preprocess_device,
        checkpoint_seconds=checkpoint_seconds,
        max_voxels=max_voxels,
        max_zip_members=max_zip_members,
        max_zip_gb=max_zip_gb,
        max_inflate_ratio=max_inflate_ratio,
        auth_file=auth_file,
        filters=tuple(filters),
        since=since,
    )
    progress = BarProgress(quiet=quiet)
    if follow:
        follow_pacs(request, poll_seconds=poll_seconds, stable_seconds=stable_seconds, quiet=quiet, as_json=as_json)
        return
    if distributed:
        summary = run_embed_distributed(request, shards=shards, progress=progress)
    else:
        summary = run_embed(request, progress=progress)
    if summary is not None:  # None on ranks other than 0
        print_summary(summary, as_json=as_json)
        exit_if_nothing_embedded(summary)


def follow_pacs(request, *, poll_seconds: float, stable_seconds: float, quiet: bool, as_json: bool) -> None:
    """``embed --follow``: poll the PACS until SIGINT or SIGTERM, which stop it between commits; each pass that
    embedded something prints its summary."""
    import signal
    import threading

    from hctembed.workflows.follow import FollowSettings, follow_embed

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for summary in follow_embed(request, settings=FollowSettings(poll_seconds=poll_seconds,
                                                                     stable_seconds=stable_seconds),
                                    stop=stop, progress=BarProgress(quiet=quiet)):  # fmt: skip
            print_summary(summary, as_json=as_json)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stderr.print("stopped following the PACS; every series embedded so far is stored")


def exit_if_nothing_embedded(summary) -> None:
    """Exit status 3 with the reason when a run asked for scans and stored none (all skipped or failed)."""
    if summary.nothing_embedded:
        stderr.print(f"[red]error:[/] {escape(summary.nothing_embedded)}", highlight=False, soft_wrap=True)
        raise typer.Exit(3)


def print_summary(summary, *, as_json: bool) -> None:
    """A run's summary as one JSON line, or as tables (summary, failures, skips)."""
    if as_json:
        print_json_lines([summary.to_dict()])
        return
    counts = summary.counts()
    for name, size in counts.pop("written", {}).items():  # what is on disk now, one row a file or folder
        counts[f"on disk: {name}"] = human_bytes(size)
    if "seconds" in counts:
        counts["seconds"] = f"{counts['seconds']:.1f}"
    print_table([{"field": k, "value": v} for k, v in counts.items()], title="embed")
    if summary.failed:
        print_table([{"source": s, "reason": r} for s, r in summary.failed], title="scans that failed to load")
    if summary.skipped:
        print_table(
            [{"source": k.source, "code": k.reason_code, "reason": k.reason} for k in summary.skipped],
            title="candidates not selected",
        )


def merge_shards_command(
    shards: Path = typer.Argument(..., help="Shard folder written by `embed --distributed` (its run.json, parts/)."),
    db: Path = typer.Option(..., "--db", help="DuckDB file (created if missing)."),
    labels: Path | None = typer.Option(None, "--labels", help="labels.csv to import."),
    index: str | None = typer.Option(None, "--index", help="FAISS index kind (see `embed --index`)."),
    keep_parts: bool = typer.Option(False, "--keep-parts", help="Keep the Parquet parts after merging."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as a JSON line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Store the Parquet parts of a sharded run in DuckDB and build the index (what rank 0 does at the end of
    `embed --distributed`; for a merge that was interrupted, or parts copied from elsewhere)."""
    from hctembed.workflows.shards import MergeRequest, run_merge

    setup_logging(quiet=quiet)
    request = MergeRequest(shards=shards, db=db, labels=labels, index=index, keep_parts=keep_parts)
    summary = run_merge(request, progress=BarProgress(quiet=quiet))
    print_summary(summary, as_json=as_json)
    exit_if_nothing_embedded(summary)
