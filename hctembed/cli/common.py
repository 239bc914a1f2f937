"""Shared CLI plumbing: logging and progress on stderr, tables and JSON lines on stdout."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
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


def json_safe(value: Any) -> Any:
    """Plain JSON values: NaN/inf become null, numpy scalars and arrays become numbers and lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def friendly_errors(command):
    """Turn errors a user can act on into one red line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except (HctembedError, FileNotFoundError, KeyError, ValueError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            stderr.print(f"[red]error:[/] {message}")
            raise typer.Exit(2) from None

    return wrapper


def run_command(command, **kwargs):
    """Call a typer command function from Python, filling every option not given with its CLI default.

    Lets ``demo`` chain commands without repeating (or breaking on) their full option lists.
    """
    import inspect

    from typer.models import ArgumentInfo, OptionInfo

    target = inspect.unwrap(command)
    for name, param in inspect.signature(target).parameters.items():
        if name in kwargs:
            continue
        default = param.default
        if isinstance(default, OptionInfo | ArgumentInfo):
            if default.default is ...:
                raise TypeError(f"{target.__name__}() needs {name}")
            kwargs[name] = default.default
    return command(**kwargs)
