"""Help pages a person can read at 80 columns: placeholders named as a shell user expects (``ARCHIVE``,
``PATH``, ``INTEGER``, ``[a|b]``), not typer's Python types (``<list[Path]>``, ``{archive}``), and command
summaries in full (wrapped), never cut with "...".

Every typer app of the CLI is built with ``cls=PlainGroup``. The group hands out its commands as
:class:`PlainCommand` with their placeholders set (for ``--help``, usage errors and runs alike), so no option
needs a ``metavar`` of its own.
"""

from __future__ import annotations

import datetime
import enum
import re
import textwrap
from pathlib import Path
from typing import Any, get_args, get_origin

import typer.core


def _annotation_placeholder(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is list:
        return _annotation_placeholder(get_args(annotation)[0])
    if origin is tuple:
        return " ".join(_annotation_placeholder(a) for a in get_args(annotation))
    if isinstance(annotation, type):
        if issubclass(annotation, enum.Enum):
            return "[" + "|".join(str(m.value) for m in annotation) + "]"
        if issubclass(annotation, bool):
            return "BOOLEAN"
        if issubclass(annotation, int):
            return "INTEGER"
        if issubclass(annotation, float):
            return "NUMBER"
        if issubclass(annotation, Path):
            return "PATH"
        if issubclass(annotation, datetime.datetime):
            return "DATE"
    return "TEXT"


def placeholder(param: Any) -> str:
    """What help and usage lines show for ``param``'s value: an argument's name (``ARCHIVE``, ``[QUERY]``,
    ``SCANS...``), an option's value type (``PATH``, ``INTEGER``, ``NUMBER NUMBER``, ``[a|b]``)."""
    if param.param_type_name == "argument":
        name = (param.name or "value").upper()
        return name + ("..." if param.nargs != 1 else "")
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None:
        return "TEXT"
    if descriptor.is_choice and descriptor.choices is not None:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in descriptor.choices) + "]"
    if descriptor.is_path:
        return "PATH"
    return _annotation_placeholder(descriptor.annotation)


def name_placeholders(command: Any) -> Any:
    """Set every parameter's placeholder that is not set already (idempotent)."""
    for param in command.params:
        if param.metavar is None and not getattr(param, "is_flag", False):
            param.metavar = placeholder(param)
    return command


def summary(command: Any) -> str:
    """A command's one-line summary: its ``short_help``, else the first sentence of its help, in full."""
    if command.short_help:
        return command.short_help
    text = " ".join((command.help or "").split())
    end = _SENTENCE_END.search(text)
    return text if end is None else text[: end.start() + 1]


# a full stop that ends a sentence: not that of an abbreviation ("Methods eq. 2", "Fig. 3", "e.g. this")
_SENTENCE_END = re.compile(r"(?<!\beq)(?<!\bFig)(?<!\be\.g)(?<!\bi\.e)\.\s+(?=[A-Z`(])")


def write_definitions(formatter: Any, rows: list[tuple[str, str]], *, col_max: int = 30, spacing: int = 2) -> None:
    """click's definition list (options, commands) wrapped at spaces only: never inside a hyphenated name
    (``vit-micro``, ``--max-voxels``, ``ct-fm``) or a long word, so every name can be copied whole."""
    first_col = min(max((len(first) for first, _ in rows), default=0), col_max) + spacing
    indent = " " * formatter.current_indent
    width = max(formatter.width - first_col - 2, 10)
    for first, second in rows:
        formatter.write(f"{indent}{first}")
        if not second:
            formatter.write("\n")
            continue
        if len(first) <= first_col - spacing:
            formatter.write(" " * (first_col - len(first)))
        else:
            formatter.write("\n" + " " * (first_col + formatter.current_indent))
        lines = textwrap.wrap(" ".join(second.split()), width, break_on_hyphens=False, break_long_words=False) or [""]
        formatter.write(lines[0] + "\n")
        for line in lines[1:]:
            formatter.write(" " * (first_col + formatter.current_indent) + line + "\n")


def _usage_pieces(command: Any, ctx: Any) -> list[str]:
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            shown = param.metavar or placeholder(param)
            pieces.append(shown if param.required else f"[{shown}]")
    return pieces


class PlainCommand(typer.core.TyperCommand):
    """A typer command whose usage line shows ``ARCHIVE`` for a required argument and ``[QUERY]`` for an
    optional one."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return _usage_pieces(self, ctx)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":  # typer shows "ARCHIVE <path>": the name says enough
                arguments.append((param.metavar or placeholder(param), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    write_definitions(formatter, rows)


class PlainGroup(typer.core.TyperGroup):
    """A typer group whose help names placeholders plainly and lists command summaries whole."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is None:
            return None
        if type(command) is typer.core.TyperCommand:  # typer builds plain commands; ours only adds methods
            command.__class__ = PlainCommand
        return name_placeholders(command)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [*_usage_pieces(self, ctx), self.subcommand_metavar]

    def format_help(self, ctx: Any, formatter: Any) -> None:
        name_placeholders(self)
        super().format_help(ctx, formatter)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, summary(command)))
        if rows:
            with formatter.section("Commands"):
                write_definitions(formatter, rows)
