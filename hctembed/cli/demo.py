"""``hctembed demo``: synth -> embed -> search -> bench on a small synthetic archive, narrated."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from hctembed.cli.common import run_command, stderr


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Working folder (archive, DB, results)."),
    n: int = typer.Option(36, "--n", min=8, help="Synthetic scans to generate."),
    model: str = typer.Option("vit-micro", "--model", help="Encoder architecture."),
    weights: Path | None = typer.Option(None, "--weights", help="safetensors encoder (default: pretrain one now)."),
    pretrain_steps: int = typer.Option(
        30, "--pretrain-steps", min=0, help="DINO steps to pretrain the encoder first (0: random init)."
    ),
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
        run_command(synth, out=archive, n=n, seed=0, matrix=128)
    stderr.rule("2/4  pretrain a tiny encoder (DINO), then embed (paper preprocessing -> 3D ViT -> DuckDB + FAISS)")
    if weights is None and pretrain_steps > 0:
        from hctembed.cli.pretrain import pretrain

        weights = out / "encoder" / "encoder.safetensors"
        if weights.exists():
            stderr.print(f"reusing the pretrained encoder {weights}")
        else:
            stderr.print(
                f"self-supervised DINO on the archive itself for {pretrain_steps} steps (2 global + 2 local crops "
                "per scan, no labels): enough for neighbours to follow the images' content a little; "
                "`hctembed pretrain` runs the real thing"
            )
            epochs = -(-pretrain_steps // max(1, n // 2))  # the schedules span about the steps run
            run_command(
                pretrain, archive=archive, method="dino", config=model, out=out / "encoder", epochs=epochs,
                max_steps=pretrain_steps, batch_size=2, local_crops=2, prototypes=1024, lr=1e-3, device="cpu",
            )  # fmt: skip
    if weights is None:
        stderr.print(
            "[yellow]note:[/] the encoder is random-initialised (no pretrained weights ship with hctembed); "
            "neighbours reflect image statistics, not learned anatomy"
        )
    run_command(embed, archive=archive, db=db, model=model, weights=weights)
    stderr.rule("3/4  search: the 5 scans most like the first scan")
    first = sorted(archive.glob("*.nii.gz"))[0]
    run_command(search, query=first, db=db, k=5)
    stderr.rule("4/4  all-vs-all retrieval benchmark per haemorrhage subtype")
    run_command(
        retrieval, db=[db], labels=archive / "labels.csv", exclude_same_patient=True, out=out / "retrieval.json"
    )
    stderr.print(f"done: database {db}, results {out / 'retrieval.json'}")
