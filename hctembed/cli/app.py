"""The ``hctembed`` command: one typer app, one module per command group."""

from __future__ import annotations

import typer

from hctembed.allocator import retain_freed_memory
from hctembed.cli import (
    bench,
    common,
    datasets,
    demo,
    embed,
    finetune,
    import_fmhct,
    import_vectors,
    models,
    pretrain,
    probe,
    scan,
    search,
    synth,
)
from hctembed.cli import explain as explain_cli
from hctembed.cli import index as index_cli
from hctembed.cli import locate as locate_cli
from hctembed.cli import map as map_cli
from hctembed.cli import serve as serve_cli
from hctembed.cli.common import friendly_errors
from hctembed.cli.help_format import PlainGroup

app = typer.Typer(
    help="Turn a head-CT archive into a searchable embedding index (FM-HCT).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=PlainGroup,  # click's plain help: nothing cut at 80 columns, flags shown as flags
)


@app.callback()
def _options(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Debug output, and other libraries' INFO lines (FAISS, DuckDB)."
    ),
) -> None:
    """Turn a head-CT archive into a searchable embedding index (FM-HCT)."""
    common.VERBOSE[0] = verbose
    retain_freed_memory()  # a command that preprocesses scans reuses their buffers' pages (hctembed/allocator.py)


app.command("synth")(friendly_errors(synth.synth))
app.command("scan")(friendly_errors(scan.scan))
app.command("embed")(friendly_errors(embed.embed))
app.command("merge-shards")(friendly_errors(embed.merge_shards_command))
app.command("search")(friendly_errors(search.search))
app.command("explain")(friendly_errors(explain_cli.explain))
app.command("locate")(friendly_errors(locate_cli.locate))
app.command("serve")(friendly_errors(serve_cli.serve))
app.command("map")(friendly_errors(map_cli.map_command))
app.add_typer(bench.app, name="bench")
app.add_typer(datasets.app, name="datasets")
app.add_typer(models.app, name="models")
app.add_typer(probe.app, name="probe")
app.add_typer(index_cli.app, name="index")
app.command("import-vectors")(friendly_errors(import_vectors.import_vectors))
app.command("pretrain")(friendly_errors(pretrain.pretrain))
app.command("finetune")(friendly_errors(finetune.finetune))
app.command("import-fmhct")(friendly_errors(import_fmhct.import_fmhct))
app.command("demo")(friendly_errors(demo.demo))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
