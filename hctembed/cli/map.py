"""``hctembed map``: a 2D projection of the stored embeddings coloured by a label or a protocol field."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import print_json_lines, print_table, setup_logging


def map_command(
    db: Path = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed`."),
    color_by: str = typer.Option(
        ..., "--color-by", help="A label (e.g. SDH), manufacturer, slice_thickness, or any labels-CSV column."
    ),
    out: Path = typer.Option(..., "--out", help="PNG to write."),
    labels: Path | None = typer.Option(None, "--labels", help="labels.csv with protocol columns (manufacturer, ...)."),
    model: str | None = typer.Option(None, "--model", help="Model id (prefix) when the DB holds several."),
    method: str = typer.Option("pca", "--method", help="pca, or umap when umap-learn is installed."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Draw the collection's embeddings in 2D (PCA by default), coloured by COLOR_BY."""
    from hctembed.embedding_map import embedding_map
    from hctembed.index.store import Store

    setup_logging(quiet=quiet)
    with Store(db, read_only=True) as store:
        result = embedding_map(store, color_by=color_by, out=out, labels_csv=labels, model=model, method=method)
    summary = {"out": str(result.path), "scans": len(result.coords), "method": result.method, "legend": result.legend}
    if as_json:
        print_json_lines([summary])
    else:
        print_table([{"field": k, "value": ", ".join(v) if isinstance(v, list) else v} for k, v in summary.items()])
