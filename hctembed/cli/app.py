"""The ``hctembed`` command: one typer app, one module per command group."""

from __future__ import annotations

import typer

from hctembed.cli import bench, demo, embed, search, synth
from hctembed.cli.common import friendly_errors

app = typer.Typer(
    help="Turn a head-CT archive into a searchable embedding index (FM-HCT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("synth")(friendly_errors(synth.synth))
app.command("embed")(friendly_errors(embed.embed))
app.command("search")(friendly_errors(search.search))
app.add_typer(bench.app, name="bench")
app.command("demo")(friendly_errors(demo.demo))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
