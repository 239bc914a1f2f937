"""Shared CLI plumbing: logging and progress on stderr, tables and JSON lines on stdout."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from hctembed.errors import HctembedError
from hctembed.json_values import json_safe

stdout = Console()
stderr = Console(stderr=True)


def setup_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=False, show_time=False)],
        force=True,
    )


def progress_bar(*, quiet: bool = False) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet,
        transient=False,
    )


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def print_table(
    rows: Sequence[dict[str, Any]], *, title: str | None = None, columns: Sequence[str] | None = None
) -> None:
    columns = list(columns or (rows[0].keys() if rows else []))
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), int | float) else "left")
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    stdout.print(table)


def print_json_lines(rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        print(json.dumps(json_safe(row)), flush=True)


# I/O failures a user can act on (a path that is wrong, unreadable, or a disk that is full)
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def friendly_errors(command):
    """Turn errors a user can act on (:class:`HctembedError`, named I/O failures) into one red line on stderr and
    exit status 2. Anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except (HctembedError, *USER_OS_ERRORS) as exc:
            stderr.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


class BarProgress:
    """:class:`hctembed.workflows.progress.Progress` drawn as rich bars on stderr (nothing when ``quiet``)."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet

    @contextmanager
    def task(self, description: str, *, total: int | None) -> Iterator:
        with progress_bar(quiet=self.quiet) as bar:
            task = bar.add_task(description, total=total)
            yield lambda k: bar.advance(task, k)


def parse_ratios(ratios: str) -> tuple[float, float, float]:
    """``--ratios`` ``"0.8,0.1,0.1"`` as three numbers, or a one-line usage error."""
    import typer

    try:
        parts = tuple(float(r) for r in ratios.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise typer.BadParameter(f"--ratios needs three numbers (train,val,test), got {ratios!r}")
    return parts  # type: ignore[return-value]
