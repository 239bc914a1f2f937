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
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as a JSON line."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Embed an archive; re-runs skip scans already embedded with the same model and preprocessing."""
    import torch

    from hctembed.embed import embed_archive
    from hctembed.index.choice import KINDS
    from hctembed.index.store import Store
    from hctembed.io.archive import scan_archive
    from hctembed.io.labels import read_labels
    from hctembed.io.manifest import is_manifest, read_manifest
    from hctembed.io.pseudonym import Pseudonymizer
    from hctembed.model.encoders import load_encoder

    setup_logging(quiet=quiet)
    if index is not None and index not in KINDS:
        raise typer.BadParameter(f"--index must be one of {', '.join(KINDS)}, not {index!r}")
    if threads:
        torch.set_num_threads(threads)
    if is_manifest(archive):
        found = read_manifest(archive)
    else:
        with progress_bar(quiet=quiet) as bar:
            task = bar.add_task("reading headers", total=None)
            found = scan_archive(
                archive,
                pseudonyms=Pseudonymizer.from_file(secret) if secret else None,
                progress=lambda k: bar.update(task, completed=k),
            )
    refs = found.selected
    if labels is None and archive.is_dir() and (archive / "labels.csv").exists():
        labels = archive / "labels.csv"
    table = read_labels(labels) if labels else None
    encoder = load_encoder(model, weights=weights, seed=seed, random_init=random_init or None)
    stderr.print(
        f"{len(refs)} scans selected, {len(found.skipped)} skipped in {archive}; "
        f"model {encoder.model_id}, preprocessing {encoder.fingerprint}"
    )
    with Store(db) as store:
        if table is not None:
            store.set_labels(
                (
                    (s, name, v)
                    for s, row in zip(table.scan_ids, table.values, strict=True)
                    for name, v in zip(table.names, row, strict=True)
                    if v == v
                ),
                origin=str(labels.name),
            )
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
    if as_json:
        print_json_lines(
            [
                summary
                | {"failures": [{"source": s, "reason": r} for s, r in report.failed]}
                | {"skips": [{"source": k.source, "code": k.reason_code, "reason": k.reason} for k in found.skipped]}
            ]
        )
    else:
        print_table([{"field": k, "value": v} for k, v in summary.items()], title="embed")
        if report.failed:
            print_table([{"source": s, "reason": r} for s, r in report.failed], title="scans that failed to load")
        if found.skipped:
            print_table(
                [{"source": k.source, "code": k.reason_code, "reason": k.reason} for k in found.skipped],
                title="candidates not selected",
            )
