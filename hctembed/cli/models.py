"""``hctembed models``: the ``--model`` ids and their weights; ``hctembed models pull`` downloads released ones."""

from __future__ import annotations

import typer

from hctembed.cli.common import friendly_errors, print_json_lines, print_table, setup_logging
from hctembed.cli.help_format import PlainGroup

app = typer.Typer(invoke_without_command=True, rich_markup_mode=None, cls=PlainGroup)  # help: the callback's docstring

TABLE_COLUMNS = ("model", "architecture", "input", "params", "dim", "licence", "weights")


@app.callback(invoke_without_command=True)
@friendly_errors
def models(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per model on stdout instead of a table."),
) -> None:
    """List the --model ids: architecture, input, size, licence, weights present or not; pull released weights.

    Lists every --model id (a table, or JSON lines with --json). Merlin's and CT-FM's weights count as
    present when they are in the Hugging Face cache that --model searches ($HF_HUB_CACHE, $HF_HOME/hub,
    ~/.cache/huggingface/hub); `hctembed models pull NAME` puts them there. Nothing is downloaded by
    listing, nor by `embed`.
    """
    if ctx.invoked_subcommand is not None:
        return
    from hctembed.model.catalogue import catalogue_rows

    rows = catalogue_rows()
    if as_json:
        print_json_lines(rows)
        return
    print_table(rows, columns=TABLE_COLUMNS, formats={"params": lambda n: f"{n / 1e6:.1f} M"})


@app.command("pull")
@friendly_errors
def pull(
    name: str = typer.Argument(..., help="Model whose released weights to download: merlin or ct-fm."),
    revision: str | None = typer.Option(
        None, "--revision", help="Branch, tag or commit of the Hub repository (default: main)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; warnings and errors only."),
) -> None:
    """Download NAME's released weights from the Hugging Face Hub into its cache, checksum verified.

    Uses huggingface_hub's standard cache and settings (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN);
    a transfer cut off mid-way is resumed within the run; with HF_HUB_OFFLINE set only the cache is used. Prints
    the file's path on stdout; afterwards --model NAME finds it.
    """
    from huggingface_hub.utils import logging as hf_logging

    from hctembed.model.hub import pull_weights

    setup_logging(quiet=quiet)
    # its own stderr handler (added on import) would print its warnings, e.g. a resumed transfer, a second time
    hf_logging.get_logger().handlers.clear()
    typer.echo(str(pull_weights(name, revision=revision, progress=not quiet)))
