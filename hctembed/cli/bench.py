"""``hctembed bench``: evaluation protocols over stored embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hctembed.cli.common import (
    friendly_errors,
    json_safe,
    print_json_lines,
    print_table,
    setup_logging,
    stderr,
)

app = typer.Typer(help="Benchmarks over stored embeddings.", no_args_is_help=True)


@app.command("retrieval")
@friendly_errors
def retrieval(
    db: Path = typer.Option(..., "--db", help="DuckDB file written by `hctembed embed`."),
    labels: Path = typer.Option(..., "--labels", help="CSV with scan_id, patient_id and 0/1 label columns."),
    model: str | None = typer.Option(None, "--model", help="Model id (prefix) when the DB holds several."),
    columns: str | None = typer.Option(None, "--columns", help="Comma-separated label columns (default: all 0/1)."),
    exclude_same_patient: bool = typer.Option(
        False, "--exclude-same-patient", help="Leave the query patient's other scans out of its gallery."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the full results (per-query AP too) as JSON."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines (one per label and a mean row)."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """All-vs-all retrieval per label (FM-HCT Methods): mAP and P@1/5/10 per subtype and their mean."""
    from hctembed.eval.bench import retrieval_benchmark
    from hctembed.index.store import Store
    from hctembed.io.labels import read_labels

    setup_logging(quiet=quiet)
    table = read_labels(labels, columns=columns.split(",") if columns else None)
    with Store(db, read_only=True) as store:
        report, model_id = retrieval_benchmark(
            store, labels=table, model=model, exclude_same_patient=exclude_same_patient
        )
    rows = [{"model_id": model_id, **row} for row in report.rows()]
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe({"model_id": model_id, **report.to_dict()}), indent=2))
        stderr.print(f"wrote {out}")
    if as_json:
        print_json_lines(rows)
    else:
        print_table(
            [{k: v for k, v in r.items() if k != "model_id"} for r in rows],
            title=f"retrieval, {model_id}, {report.n_scans} scans"
            + (", same patient excluded" if exclude_same_patient else ""),
        )
