"""``hctembed demo``: synth -> pretrain -> embed -> search -> bench on a small synthetic archive, narrated.

Each step calls the library workflow directly (the same functions the commands call)."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from hctembed.cli.common import ARCHITECTURES, BarProgress, stderr


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Working folder (archive, DB, results)."),
    n: int = typer.Option(36, "--n", min=8, help="Synthetic scans to generate."),
    model: str = typer.Option("vit-micro", "--model", help=f"Encoder architecture: {ARCHITECTURES}."),
    weights: Path | None = typer.Option(None, "--weights", help="safetensors encoder (default: pretrain one now)."),
    pretrain_steps: int = typer.Option(
        30, "--pretrain-steps", min=0, help="DINO steps to pretrain the encoder first (0: random init)."
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Delete OUT first."),
) -> None:
    """Run the whole path on synthetic data, a few minutes on 2 cores."""
    from hctembed.cli.bench import show_results
    from hctembed.cli.common import setup_logging
    from hctembed.cli.embed import print_summary
    from hctembed.cli.search import print_hits
    from hctembed.index.store import Store
    from hctembed.search import search_file
    from hctembed.workflows.bench import BenchInputs, RetrievalRequest, run_retrieval, write_results
    from hctembed.workflows.embed import EmbedRequest, run_embed

    setup_logging()
    if fresh and out.exists():
        shutil.rmtree(out)
    archive, db, progress = out / "archive", out / "hctembed.duckdb", BarProgress()
    stderr.rule("1/4  synthesise a head-CT archive")
    _synthesise(archive, n=n)
    stderr.rule("2/4  pretrain a tiny encoder (DINO), then embed (paper preprocessing -> 3D ViT -> DuckDB + FAISS)")
    if weights is None and pretrain_steps > 0:
        weights = _pretrain(archive, out / "encoder", model=model, steps=pretrain_steps, n=n)
    if weights is None:
        stderr.print(
            "[yellow]note:[/] the encoder is random-initialised (no pretrained weights ship with hctembed); "
            "neighbours reflect image statistics, not learned anatomy"
        )
    print_summary(run_embed(EmbedRequest(archive=archive, db=db, model=model, weights=weights), progress=progress),
                  as_json=False)  # fmt: skip
    stderr.rule("3/4  search: the 5 scans most like the first scan")
    first = sorted(archive.glob("*.nii.gz"))[0]
    with Store(db, read_only=True) as store:
        print_hits(search_file(store, path=first, k=5), title=f"top 5 for {first}")
    stderr.rule("4/4  all-vs-all retrieval benchmark per haemorrhage subtype")
    request = RetrievalRequest(BenchInputs(dbs=(db,), labels=archive / "labels.csv"), exclude_same_patient=True)
    results = run_retrieval(request)
    write_results(results, out_dir=None, out=out / "retrieval.json")
    show_results(results, out_dir=None, as_json=False)
    stderr.print(f"done: database {db}, results {out / 'retrieval.json'}")


def _synthesise(archive: Path, *, n: int) -> None:
    from hctembed.synth import SynthConfig, generate_archive

    if (archive / "labels.csv").exists():
        stderr.print(f"reusing {archive} (use --fresh to regenerate)")
        return
    with BarProgress().task("synthesising", total=n) as advance:
        done = [0]

        def report(k: int) -> None:
            advance(k - done[0])
            done[0] = k

        generate_archive(archive, n=n, seed=0, config=SynthConfig(matrix=128), progress=report)


def _pretrain(archive: Path, run_dir: Path, *, model: str, steps: int, n: int) -> Path:
    from hctembed.pretrain import PretrainConfig
    from hctembed.workflows.pretrain import pretrain_archive

    weights = run_dir / "encoder.safetensors"
    if weights.exists():
        stderr.print(f"reusing the pretrained encoder {weights}")
        return weights
    stderr.print(
        f"self-supervised DINO on the archive itself for {steps} steps (2 global + 2 local crops per scan, no "
        "labels). That is far too little to learn anything: the demo shows the path, not a trained model; "
        f"{run_dir}/curves.png and log.jsonl show the monitors (a uniform teacher output is the sign)"
    )
    config = PretrainConfig(
        method="dino", model=model, epochs=-(-steps // max(1, n // 2)),  # the schedules span about the steps run
        max_steps=steps, batch_size=2, local_crops=2, prototypes=1024, lr=1e-3,
    )  # fmt: skip
    result = pretrain_archive(archive, config=config, out=run_dir, device="cpu")
    return result.encoder_path if result is not None else weights
