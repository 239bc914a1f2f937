"""``hctembed synth``: write a synthetic head-CT archive (NIfTI + labels.csv)."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import progress_bar, setup_logging, stderr


def synth(
    out: Path = typer.Argument(..., help="Folder to write <scan_id>.nii.gz files and labels.csv into."),
    n: int = typer.Option(40, "--n", min=1, help="Number of scans (patients get 1-3 scans each)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same archive."),
    matrix: int = typer.Option(128, "--matrix", min=32, help="In-plane voxels (512 is a real scanner)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes rendering patients (same files whatever N)."),
    lesion_scale: float = typer.Option(
        1.0,
        "--lesion-scale",
        min=0.1,
        max=4.0,
        help="Linear size of every bleed against the default (2 = 8x a blob's volume); 1 writes the default archive.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Generate synthetic head CTs with haemorrhage subtypes (EDH, SDH, IPH, IVH, SAH) and scanner variation."""
    from hctembed.synth import SynthConfig, generate_archive

    setup_logging(quiet=quiet)
    with progress_bar(quiet=quiet) as bar:
        task = bar.add_task("synthesising", total=n)
        records = generate_archive(
            out,
            n=n,
            seed=seed,
            config=SynthConfig(matrix=matrix, lesion_scale=lesion_scale),
            progress=lambda k: bar.update(task, completed=k),
            workers=workers,
        )
    patients = len({r.patient_id for r in records})
    stderr.print(f"wrote {len(records)} scans of {patients} patients and labels.csv to {out}")
