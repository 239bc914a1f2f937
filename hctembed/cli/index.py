"""``hctembed index build``: (re)build a collection's FAISS index of a chosen kind, for ``search`` and ``serve``."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import friendly_errors, print_json_lines, print_table, setup_logging
from hctembed.cli.help_format import PlainGroup

app = typer.Typer(rich_markup_mode=None, cls=PlainGroup, help="The FAISS index beside a database.")


@app.command("build")
@friendly_errors
def build(
    db: Path = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed` or `import-vectors`."),
    kind: str = typer.Option(
        "auto",
        "--kind",
        help="exact, hnsw, ivf, ivfpq (re-ranked exactly) or auto (exact until an approximate "
        "index holds recall@10 >= 0.99 faster).",
    ),
    model: str | None = typer.Option(None, "--model", help="Model id (prefix) when the DB holds several."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Build the collection's index of --kind (recall@10 and latency measured as it is tuned) and save it beside the
    database, where `search` and `serve` load it from."""
    import json

    from hctembed.index.choice import KINDS, IndexOptions
    from hctembed.index.store import Store
    from hctembed.index.vectors import open_index

    setup_logging(quiet=quiet)
    if kind not in KINDS:
        raise typer.BadParameter(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    with Store(db) as store:
        collection = store.resolve_collection(model_id=model)
        open_index(collection, rebuild=True, quiet=True, options=IndexOptions(kind=kind))
        manifest = json.loads(collection.index_files()[1].read_text())
    keys = ("model_id", "kind", "factory", "ntotal", "search_params", "recall_at_10", "p50_ms", "exact_p50_ms",
            "build_seconds")  # fmt: skip
    row = {k: manifest.get(k) for k in keys}
    if as_json:
        print_json_lines([row])
        return
    print_table([{"field": k, "value": v} for k, v in row.items()], title="index")
