"""``hctembed demo``: synth -> embed -> search -> bench on a small synthetic archive, narrated."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from hctembed.cli.common import stderr


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Working folder (archive, DB, results)."),
    n: int = typer.Option(36, "--n", min=8, help="Synthetic scans to generate."),
    model: str = typer.Option("vit-base", "--model", help="Encoder architecture."),
    weights: Path | None = typer.Option(None, "--weights", help="safetensors encoder (default: random init)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete OUT first."),
) -> None:
    """Run the whole path on synthetic data, a few minutes on 2 cores."""
    from hctembed.cli.bench import retrieval
    from hctembed.cli.embed import embed
    from hctembed.cli.search import search
    from hctembed.cli.synth import synth

    if fresh and out.exists():
        shutil.rmtree(out)
    archive, db = out / "archive", out / "hctembed.duckdb"
    stderr.rule("1/4  synthesise a head-CT archive")
    if (archive / "labels.csv").exists():
        stderr.print(f"reusing {archive} (use --fresh to regenerate)")
    else:
        synth(out=archive, n=n, seed=0, matrix=128, quiet=False)
    stderr.rule("2/4  embed it (paper preprocessing -> 3D ViT -> DuckDB + FAISS)")
    if weights is None:
        stderr.print(
            "[yellow]note:[/] the encoder is random-initialised (no pretrained weights ship with hctembed); "
            "neighbours reflect image statistics, not learned anatomy"
        )
    embed(
        archive=archive,
        db=db,
        model=model,
        weights=weights,
        seed=0,
        labels=None,
        batch_size=2,
        workers=1,
        threads=None,
        as_json=False,
        quiet=False,
    )
    stderr.rule("3/4  search: the 5 scans most like the first scan")
    first = sorted(archive.glob("*.nii.gz"))[0]
    search(query=first, db=db, scan_id=None, k=5, model=None, as_json=False, quiet=False)
    stderr.rule("4/4  all-vs-all retrieval benchmark per haemorrhage subtype")
    retrieval(
        db=db,
        labels=archive / "labels.csv",
        model=None,
        columns=None,
        exclude_same_patient=True,
        out=out / "retrieval.json",
        as_json=False,
        quiet=False,
    )
    stderr.print(f"done: database {db}, results {out / 'retrieval.json'}")
