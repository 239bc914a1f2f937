"""``hctembed import-vectors``: precomputed embeddings (Parquet or .npy) as their own collection."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import print_json_lines, setup_logging, stderr


def import_vectors(
    file: Path = typer.Argument(..., help=".parquet (scan_id, vector) or .npy with FILE.scan_ids.txt beside it."),
    db: Path = typer.Option(..., "--db", help="DuckDB file (created if missing)."),
    name: str = typer.Option(..., "--name", help="Short name of the source model, e.g. google-ct-foundation."),
    index: str | None = typer.Option(
        None, "--index", help="FAISS index: exact, hnsw, ivf, ivfpq or auto (see `embed --index`); default auto."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Import vectors made elsewhere; benchmarks then compare them with --model precomputed-NAME-..."""
    from hctembed.index.choice import KINDS
    from hctembed.index.precomputed import import_vectors as run
    from hctembed.index.precomputed import read_vectors
    from hctembed.index.store import Store

    setup_logging(quiet=quiet)
    if index is not None and index not in KINDS:
        raise typer.BadParameter(f"--index must be one of {', '.join(KINDS)}, not {index!r}")
    imported = read_vectors(file, name=name)
    with Store(db) as store:
        n = run(store, imported, name=name, source=str(file.resolve()), index_kind=index)
    stderr.print(f"imported {n} vectors of dim {imported.vectors.shape[1]} as {imported.model_id}")
    print_json_lines([{"model_id": imported.model_id, "vectors": n, "dim": int(imported.vectors.shape[1])}])
