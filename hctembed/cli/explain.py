"""``hctembed explain``: attention maps and attention distance of one scan, as PNGs and a JSON file."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import ARCHITECTURES, print_json_lines, print_table, setup_logging, stderr


def explain(
    scan: Path | None = typer.Argument(None, help="Scan file (NIfTI, or a DICOM series' folder or zip)."),
    scan_id: str | None = typer.Option(
        None, "--id", help="A stored scan instead of a file (needs --db; found through the database's locator)."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for the PNGs and attention_distance.json."),
    weights: Path | None = typer.Option(None, "--weights", help="safetensors encoder; random init if omitted."),
    model: str | None = typer.Option(
        None,
        "--model",
        help=f"Architecture ({ARCHITECTURES}; default vit-base); with --db, the stored model id (prefix).",
    ),
    db: Path | None = typer.Option(None, "--db", help="Use the model a database was embedded with (as search does)."),
    seed: int = typer.Option(0, "--seed", help="Seed for a random-initialised encoder."),
    as_json: bool = typer.Option(False, "--json", help="Print the written files and distances as a JSON line."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """CLS attention (last layer and rollout) over axial/coronal/sagittal slices in each window, and the
    attention distance per layer and head (FM-HCT Methods eq. 1)."""
    from hctembed.explain import explain as explain_input
    from hctembed.explain import patch_size_mm, write_explanation
    from hctembed.io.archive import load_volume
    from hctembed.model.encoders import load_encoder
    from hctembed.preprocessing import preprocess

    setup_logging(quiet=quiet)
    if (scan is None) == (scan_id is None):
        raise typer.BadParameter("give a scan file or --id SCAN, not both or neither")
    if scan_id is not None:
        if db is None:
            raise typer.BadParameter("--id needs --db")
        scan = _located(db, scan_id)
    if db is not None:
        if weights is not None:
            raise typer.BadParameter("give --db or --weights, not both")
        from hctembed.index.store import Store
        from hctembed.search import stored_encoder

        with Store(db, read_only=True) as store:
            encoder = stored_encoder(store.resolve_collection(model_id=model))
    else:
        encoder = load_encoder(model or "vit-base", weights=weights, seed=seed)
        if weights is None:
            stderr.print(f"[yellow]note:[/] {encoder.name} is random-initialised (seed {seed}); pass --weights or --db")
    x = preprocess(load_volume(scan), config=encoder.preprocess)
    pmm = patch_size_mm(vit=encoder.model.config, preprocess=encoder.preprocess)
    expl = explain_input(encoder.model, x, patch_mm=pmm)
    name = scan_id or "a scan file"  # never the file's name: pictures get shared, and names can carry PHI
    paths = write_explanation(
        expl, out_dir=out, windows=encoder.preprocess.windows, title=f"{name} ({encoder.model_id})"
    )
    summary = expl.distance_summary()
    if as_json:
        print_json_lines([{"model_id": encoder.model_id, "files": {k: str(p) for k, p in paths.items()}, **summary}])
        return
    print_table(
        [
            {"layer": r["layer"], "mean_mm": r["mean_mm"], "heads_mm": " ".join(f"{v:.1f}" for v in r["heads_mm"])}
            for r in summary["layers"]
        ],
        title=f"attention distance (mm), patch {pmm:g} mm, model {encoder.model_id}",
    )
    print_table([{"file": str(p)} for p in paths.values()], title="written")


def _located(db: Path, scan_id: str) -> Path:
    """The file or folder of a stored scan, from the locator beside ``db``."""
    from hctembed.errors import InputError
    from hctembed.index.store import Store

    with Store(db, read_only=True) as store:
        if not store.scans.exists(scan_id):
            raise InputError(f"no such scan: {scan_id!r} is not in {db.name}")
        where = store.locations([scan_id]).get(scan_id)
    if where is None:
        raise InputError(f"{db.name} does not know where scan {scan_id} lies (no entry in {db.name}.locator)")
    if not where.path.exists():
        raise InputError(f"scan {scan_id}: its file is no longer where {db.name}.locator says")
    return where.path
