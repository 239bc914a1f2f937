"""The zip admission limits as options, one definition for every command that walks or loads an archive
(``scan``, ``embed``); their defaults are :class:`hctembed.io.admission.Limits`'."""

from __future__ import annotations

import typer

from hctembed.io.admission import Limits

MAX_ZIP_MEMBERS = typer.Option(
    Limits.max_zip_members, "--max-zip-members", min=1, help="A zip holding more members is skipped whole."
)
MAX_ZIP_GB = typer.Option(
    Limits.max_zip_bytes / 2**30,
    "--max-zip-gb",
    min=0.001,
    help="A zip whose members inflate to more than this, together, is skipped whole.",
)
MAX_INFLATE_RATIO = typer.Option(
    Limits.max_inflate_ratio,
    "--max-inflate-ratio",
    min=1.0,
    help="A zip member that inflates more-fold (a zip bomb) makes its zip skipped, unread.",
)
