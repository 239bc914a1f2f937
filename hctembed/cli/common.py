"""Shared CLI plumbing: logging and progress on stderr, tables and JSON lines on stdout."""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from rich.console import Console
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

from hctembed.config import FOREIGN_MODELS, VIT_PRESETS
from hctembed.errors import HctembedError
from hctembed.json_values import json_safe

ARCHITECTURES = ", ".join([*VIT_PRESETS, *FOREIGN_MODELS])  # every --model architecture, for help texts

stdout = Console()
stderr = Console(stderr=True)


VERBOSE = [False]  # set by the app's -v/--verbose (CLI state; the library never reads it)


class ConsoleLogHandler(logging.Handler):
    """Log records as one line each on stderr: ``warning: ...`` / ``error: ...``, plain INFO, never wrapped."""

    PREFIX: ClassVar[dict[int, str]] = {
        logging.DEBUG: "[dim]debug:[/] ",
        logging.WARNING: "[yellow]warning:[/] ",
        logging.ERROR: "[red]error:[/] ",
    }

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
        except Exception:
            self.handleError(record)
            return
        prefix = self.PREFIX.get(min(record.levelno, logging.ERROR), "")
        stderr.print(prefix + escape(message), soft_wrap=True, highlight=False)


def setup_logging(*, verbose: bool = False, quiet: bool = False) -> None:
    """hctembed's own INFO lines (WARNING with ``quiet``); other libraries' only from WARNING on, unless -v."""
    verbose = verbose or VERBOSE[0]
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = ConsoleLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s" if not verbose else "%(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("hctembed").setLevel(level)


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
    text = str(value)  # a file name with a newline or a control character stays on its row, visibly
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def print_table(
    rows: Sequence[dict[str, Any]],
    *,
    title: str | None = None,
    columns: Sequence[str] | None = None,
    formats: dict[str, Callable[[Any], str]] | None = None,
) -> None:
    """Rows as a table on stdout, every word whole: no id, path or word is cut or broken across lines, at any
    terminal width. A table too wide for the terminal even with its text wrapped at spaces is printed as one
    block of ``field value`` lines per row instead. ``formats``: a column's own cell formatter."""
    columns = list(columns or (rows[0].keys() if rows else []))
    formats = formats or {}
    cells = [[formats.get(c, _fmt)(row.get(c)) for c in columns] for row in rows]
    numeric = {c: bool(rows) and isinstance(rows[0].get(c), int | float) for c in columns}
    # each column's narrowest width that breaks no word (header included)
    narrowest = [max([_longest_word(c)] + [_longest_word(r[i]) for r in cells]) for i, c in enumerate(columns)]
    if sum(narrowest) + 3 * len(columns) + 1 <= stdout.width or not columns:
        table = Table(title=title)
        for c, least in zip(columns, narrowest, strict=True):
            table.add_column(c, justify="right" if numeric[c] else "left", min_width=least, overflow="fold")
        for r in cells:
            table.add_row(*r)
        stdout.print(table)
        return
    if title:
        stdout.print(f"[bold]{escape(title)}[/]", highlight=False)
    if columns == ["field", "value"]:  # a one-row summary: one "field  value" line each
        block = Table.grid(padding=(0, 2))
        block.add_column(no_wrap=True, style="bold")
        block.add_column(overflow="fold")
        for field_name, value in cells:
            block.add_row(escape(field_name), escape(value))
        stdout.print(block)
        return
    for k, r in enumerate(cells):
        block = Table.grid(padding=(0, 2))
        block.add_column(no_wrap=True, style="bold")
        block.add_column(overflow="fold")
        for c, value in zip(columns, r, strict=True):
            block.add_row(escape(c), escape(value))
        if k:
            stdout.print()
        stdout.print(block)


def _longest_word(text: str) -> int:
    return max((len(w) for w in text.split()), default=0)


def distinct_decimals(values: Sequence[float], *, least: int = 4, most: int = 8) -> int:
    """The fewest decimals (``least`` to ``most``) that keep every pair of different ``values`` different when
    printed, so that a ranking of scores never shows as ties (0.9997 four times)."""
    distinct = sorted({float(v) for v in values if not math.isnan(v)})
    for decimals in range(least, most + 1):
        if len({f"{v:.{decimals}f}" for v in distinct}) == len(distinct):
            return decimals
    return most


def human_bytes(n: int) -> str:
    """``1.3 MB``, ``812 kB``, ``0 B`` (powers of 1000, as ``du --si``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n} B"


def print_json_lines(rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        print(json.dumps(json_safe(row)), flush=True)


# I/O failures a user can act on (a path that is wrong, unreadable, or a disk that is full)
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # full, over a size limit, read-only


def os_error_message(exc: OSError) -> str:
    """``No such file or directory: nope.csv`` rather than ``[Errno 2] No such file or directory: 'nope.csv'``."""
    if exc.strerror and exc.filename:
        return f"{exc.strerror.lower()}: {exc.filename}"
    return exc.strerror or str(exc)


def friendly_errors(command):
    """Turn errors a user can act on (:class:`HctembedError`, named I/O failures) into one red line on stderr and
    exit status 2. Anything else is a bug and keeps its traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except HctembedError as exc:
            stderr.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except USER_OS_ERRORS as exc:
            stderr.print(f"[red]error:[/] {escape(os_error_message(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in FULL_OR_READ_ONLY:
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            stderr.print(
                f"[red]error:[/] {escape(exc.strerror or str(exc))}{escape(where)}: finished batches are stored; "
                "free space (or make it writable) and run again",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None

    return wrapper


class BarProgress:
    """:class:`hctembed.workflows.progress.Progress` drawn as rich bars on stderr (nothing when ``quiet``).

    A bar appears on the first advance, so work that turns out to be empty (no DICOM headers to read in a
    folder of NIfTI files) draws nothing."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet

    @contextmanager
    def task(self, description: str, *, total: int | None) -> Iterator:
        bar = progress_bar(quiet=self.quiet)
        state: dict[str, Any] = {}

        def advance(k: int) -> None:
            if "task" not in state:
                bar.start()
                state["task"] = bar.add_task(description, total=total)
            bar.advance(state["task"], k)

        try:
            yield advance
        finally:
            if "task" in state:
                bar.stop()


def parse_numbers(text: str, *, option: str, names: tuple[str, ...]) -> tuple[float, ...]:
    """``option``'s value, comma-separated, as ``len(names)`` numbers, or a one-line usage error naming them."""
    import typer

    try:
        parts = tuple(float(part) for part in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != len(names):
        raise typer.BadParameter(f"{option} needs {len(names)} numbers ({','.join(names)}), got {text!r}")
    return parts


def parse_ratios(ratios: str) -> tuple[float, float, float]:
    """``--ratios`` ``"0.8,0.1,0.1"`` as three numbers, or a one-line usage error."""
    return parse_numbers(ratios, option="--ratios", names=("train", "val", "test"))  # type: ignore[return-value]
