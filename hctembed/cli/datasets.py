"""``hctembed datasets``: labels for public data-set layouts (RSNA, CQ500), keyed like ``embed`` keys series."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import friendly_errors, setup_logging, stderr
from hctembed.cli.help_format import PlainGroup

app = typer.Typer(
    help="Turn public data-set layouts into series-level labels.",
    no_args_is_help=True,
    rich_markup_mode=None,
    cls=PlainGroup,
)


def _write(result, out: Path) -> None:
    result.write_csv(out)
    positives = {c: sum(int(r[c]) for r in result.rows) for c in result.columns}
    stderr.print(f"wrote {len(result.rows)} series to {out}; positives: {positives}")
    for note in result.notes:
        stderr.print(f"[yellow]note:[/] {note}")


@app.command("rsna")
@friendly_errors
def rsna(
    path: Path = typer.Argument(..., help="Folder with the per-slice DICOM files and stage_2_train.csv."),
    out: Path = typer.Option(Path("labels.csv"), "--out", help="Labels CSV to write."),
    csv_name: str = typer.Option("stage_2_train.csv", "--csv", help="Label file name inside PATH."),
    secret: Path | None = typer.Option(None, "--secret", help="Pseudonym secret file (as for embed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """RSNA Intracranial Haemorrhage: series labels = any positive slice (EDH, IPH, IVH, SAH, SDH, any)."""
    from hctembed.io.datasets import rsna_labels
    from hctembed.io.pseudonym import Pseudonymizer

    setup_logging(quiet=quiet)
    _write(rsna_labels(path, pseudonyms=Pseudonymizer.from_file(secret), csv_name=csv_name), out)


@app.command("cq500")
@friendly_errors
def cq500(
    path: Path = typer.Argument(..., help="Folder with the CQ500 patient folders and reads.csv."),
    out: Path = typer.Option(Path("labels.csv"), "--out", help="Labels CSV to write."),
    reads: str = typer.Option("reads.csv", "--reads", help="Reads file name inside PATH."),
    secret: Path | None = typer.Option(None, "--secret", help="Pseudonym secret file (as for embed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """CQ500: per-series labels by majority vote of three readers; patient ids kept for exclusion."""
    from hctembed.io.datasets import cq500_labels
    from hctembed.io.pseudonym import Pseudonymizer

    setup_logging(quiet=quiet)
    _write(cq500_labels(path, pseudonyms=Pseudonymizer.from_file(secret), reads_name=reads), out)
