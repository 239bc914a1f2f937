"""``hctembed locate``: where scans and skipped files lie, from the locator beside a database or manifest.

Everything shared names scans and skipped files by keyed pseudonyms; this command, run where the archive
is, turns them back into paths for the person fixing a failed file.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import print_json_lines, print_table, setup_logging


def locate(
    keys: list[str] = typer.Argument(None, help="Scan ids or skip-row sources (fi-..., fo-..., se-...)."),
    db: Path | None = typer.Option(None, "--db", help="A database: its locator DB.locator."),
    manifest: Path | None = typer.Option(None, "--manifest", help="A manifest: its locator MANIFEST.locator."),
    every: bool = typer.Option(False, "--all", help="Every entry instead of KEYS."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Print the file or folder (and archive) of each key. The output holds paths: keep it local."""
    from hctembed.errors import InputError
    from hctembed.io.locator import Locator, locator_path

    setup_logging(quiet=quiet)
    if (db is None) == (manifest is None):
        raise typer.BadParameter("give --db or --manifest")
    if not keys and not every:
        raise typer.BadParameter("give KEYS or --all")
    where = locator_path(db or manifest)
    if not where.exists():
        raise InputError(f"no locator at {where}: it lies beside the database or manifest it belongs to")
    with Locator(where, read_only=True) as locator:
        found = locator.all() if every else list(locator.get(list(keys)).values())
    known = {e.key for e in found}
    rows = [
        {"key": e.key, "path": str(e.path), "root": e.root, "location": e.location, "files": len(e.files)}
        for e in sorted(found, key=lambda e: e.key)
    ]
    rows += [{"key": k, "path": None, "root": None, "location": None, "files": 0} for k in keys or () if k not in known]
    if as_json:
        print_json_lines(rows)
        return
    print_table(
        [{"key": r["key"], "path": r["path"] or "(not in the locator)", "files": r["files"] or ""} for r in rows]
    )
