"""``hctembed demo``: synth -> pretrain -> embed -> search -> bench -> pictures on a small synthetic archive.

Each step calls the library workflow directly (the same functions the commands call)."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from hctembed.cli.common import ARCHITECTURES, BarProgress, stderr, stdout


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="Working folder (archive, DB, pictures, results)."),
    n: int = typer.Option(36, "--n", min=8, help="Synthetic scans to generate."),
    model: str = typer.Option("vit-micro", "--model", help=f"Encoder architecture: {ARCHITECTURES}."),
    weights: Path | None = typer.Option(None, "--weights", help="safetensors encoder (default: pretrain one now)."),
    pretrain_steps: int = typer.Option(
        36, "--pretrain-steps", min=0, help="DINO steps to pretrain the encoder first (0: random init)."
    ),
    fresh: bool = typer.Option(False, "--fresh", help="Delete OUT first."),
    keep: bool = typer.Option(
        False, "--keep", help="Keep the pretraining cache and checkpoint (removed at the end by default)."
    ),
) -> None:
    """Run the whole path on synthetic data (about 1-2 minutes on 2 cores) and draw its pictures."""
    from hctembed.cli.common import setup_logging
    from hctembed.cli.embed import print_summary

    setup_logging()
    if fresh and out.exists():
        shutil.rmtree(out)
    archive, db, progress = out / "archive", out / "hctembed.duckdb", BarProgress()
    stderr.rule("1/5  synthesise a head-CT archive")
    _synthesise(archive, n=n)
    stderr.rule("2/5  pretrain a tiny encoder (DINO), then embed (paper preprocessing -> 3D ViT -> DuckDB + FAISS)")
    if weights is None and pretrain_steps > 0:
        weights = _pretrain(archive, out / "encoder", model=model, steps=pretrain_steps, n=n)
    from hctembed.workflows.embed import EmbedRequest, run_embed

    summary = run_embed(EmbedRequest(archive=archive, db=db, model=model, weights=weights), progress=progress)
    print_summary(summary, as_json=False)
    query = _first_scan_id(archive)
    stderr.rule(f"3/5  search: the 5 scans most like {query}")
    pictures = _search(db, query=query, out=out)
    stderr.rule("4/5  all-vs-all retrieval benchmark per haemorrhage subtype, beside chance")
    _benchmark(db, out=out)
    stderr.rule("5/5  what the encoder attends to, and the archive as a map")
    pictures += _explain(db, archive=archive, query=query, out=out / "explain")
    pictures += _map(db, out=out / "map.png")
    _finish(out, pictures=pictures, keep=keep)


def _first_scan_id(archive: Path) -> str:
    return sorted(archive.glob("*.nii.gz"))[0].name.removesuffix(".nii.gz")


def _search(db: Path, *, query: str, out: Path) -> list[Path]:
    from hctembed.cli.search import print_hits, write_search_pictures
    from hctembed.index.store import Store
    from hctembed.search import search_id

    with Store(db, read_only=True) as store:
        hits = search_id(store, scan_id=query, k=5)
        print_hits(hits, title=f"top 5 for {query} (itself excluded)")
        return write_search_pictures(
            store,
            hits,
            query=None,
            scan_id=query,
            model=None,
            montage=out / "search.png",
            html_page=out / "search.html",
        )


def _benchmark(db: Path, *, out: Path) -> None:
    from hctembed.cli.bench import show_results
    from hctembed.workflows.bench import BenchInputs, RetrievalRequest, run_retrieval

    results = run_retrieval(RetrievalRequest(BenchInputs(dbs=(db,)), exclude_same_patient=True))
    show_results(results, out_dir=None, out=out / "retrieval.json", as_json=False)
    mean = next(r for r in results.rows() if r["label"] == "mean")
    stderr.print(
        f"mean mAP {mean['mAP']:.3f} against {mean['chance']:.3f} for a random ranking: with a few dozen scans and an "
        "encoder trained for seconds, this shows that every stage runs end to end, not that the embeddings are good "
        "(BENCHMARKS.md says what pretraining does and does not reach)."
    )


def _explain(db: Path, *, archive: Path, query: str, out: Path) -> list[Path]:
    from hctembed.explain import explain, patch_size_mm, write_explanation
    from hctembed.index.store import Store
    from hctembed.io.archive import load_volume
    from hctembed.preprocessing import preprocess
    from hctembed.search import stored_encoder

    with Store(db, read_only=True) as store:
        encoder = stored_encoder(store.resolve_collection())
    x = preprocess(load_volume(archive / f"{query}.nii.gz"), config=encoder.preprocess)
    expl = explain(encoder.model, x, patch_mm=patch_size_mm(vit=encoder.model.config, preprocess=encoder.preprocess))
    paths = write_explanation(
        expl, out_dir=out, windows=encoder.preprocess.windows, title=f"{query} ({encoder.model_id})"
    )
    return [p for p in paths.values() if p.suffix == ".png"]


def _map(db: Path, *, out: Path) -> list[Path]:
    from hctembed.embedding_map import embedding_map
    from hctembed.index.store import Store

    with Store(db, read_only=True) as store:
        return [embedding_map(store, color_by="SAH", out=out).path]


def _finish(out: Path, *, pictures: list[Path], keep: bool) -> None:
    """List the pictures, drop what only pretraining needed (unless ``keep``), and say how much disk is used."""
    removed = 0
    if not keep:
        for path in (out / "encoder" / "cache", out / "encoder" / "checkpoint.pt"):
            if path.exists():
                removed += _size(path)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    stdout.print("\n[bold]pictures[/] (open them):")
    for path in pictures:
        stdout.print(f"  {path}", soft_wrap=True, highlight=False)  # whole paths, to copy
    stdout.print(
        f"\n{out}/ uses {_size(out) / 1e6:.0f} MB"
        + (
            f" ({removed / 1e6:.0f} MB of pretraining cache and checkpoint removed; --keep keeps them)"
            if removed
            else ""
        )
        + f". Next: source .venv/bin/activate, then e.g. hctembed search --id {_first_scan_id(out / 'archive')} "
        f"--db {out / 'hctembed.duckdb'} -k 5",
        soft_wrap=True,
        highlight=False,
    )


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


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
