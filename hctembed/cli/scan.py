"""``hctembed scan``: list every candidate scan of an archive with its decision, and write a manifest."""

from __future__ import annotations

from pathlib import Path

import typer

from hctembed.cli.common import BarProgress, print_json_lines, print_table, setup_logging, stderr
from hctembed.cli.dicomweb_options import AUTH_FILE, FILTERS, SINCE
from hctembed.cli.zip_options import MAX_INFLATE_RATIO, MAX_ZIP_GB, MAX_ZIP_MEMBERS


def scan(
    archive: str = typer.Argument(
        ..., help="Folder, NIfTI/DICOM file, zip of DICOM, or a PACS as dicomweb+http(s)://HOST:PORT/PATH."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the manifest (Parquet) here."),
    min_slices: int = typer.Option(10, "--min-slices", min=1, help="Fewest slices a series needs to be a volume."),
    thickness: tuple[float, float] = typer.Option((0.5, 5.0), "--thickness", help="Slice thickness range, mm."),
    kvp: tuple[float, float] = typer.Option((70.0, 150.0), "--kvp", help="kVp range."),
    allow_contrast: bool = typer.Option(False, "--allow-contrast", help="Accept contrast-enhanced series too."),
    allow_non_head: bool = typer.Option(
        False,
        "--allow-non-head",
        help="Accept series whose header says another body region (BodyPartExamined, descriptions, a field of "
        "view over 400 mm); otherwise skipped as not_head. The image test runs at embed time.",
    ),
    kernel: str | None = typer.Option(None, "--kernel", help="Regex the convolution kernel must match."),
    description: str | None = typer.Option(
        None, "--description", help="Regex (case-insensitive) for SeriesDescription."
    ),
    secret: Path | None = typer.Option(None, "--secret", help="Pseudonym secret file."),
    pseudonymise_files: bool = typer.Option(
        False,
        "--pseudonymise-files",
        help="Name NIfTI scans by keyed pseudonyms of their paths (fi-...) instead of the paths (DICOM series and "
        "skipped files always are); a labels CSV keyed by file name or stem still joins.",
    ),
    max_zip_members: int = MAX_ZIP_MEMBERS,
    max_zip_gb: float = MAX_ZIP_GB,
    max_inflate_ratio: float = MAX_INFLATE_RATIO,
    auth_file: Path | None = AUTH_FILE,
    filters: list[str] = FILTERS,
    since: str | None = SINCE,
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of a table."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
) -> None:
    """Find DICOM series (split into stacks), NIfTI files and zips; decide which are head CT to embed."""
    from hctembed.io.admission import Limits
    from hctembed.io.locator import locator_path
    from hctembed.io.manifest import manifest_rows, write_manifest
    from hctembed.io.selection import SelectionConfig
    from hctembed.io.sources import FindOptions, open_source

    setup_logging(quiet=quiet)
    config = SelectionConfig(
        min_slices=min_slices,
        slice_thickness_mm=thickness,
        kvp=kvp,
        allow_contrast=allow_contrast,
        allow_non_head=allow_non_head,
        kernel_pattern=kernel,
        description_pattern=description,
    )
    source = open_source(archive, auth_file=auth_file, filters=tuple(filters), since=since)
    limits = Limits.of_options(
        max_zip_members=max_zip_members, max_zip_gb=max_zip_gb, max_inflate_ratio=max_inflate_ratio
    )
    options = FindOptions(selection=config, secret=secret, pseudonymise_files=pseudonymise_files, limits=limits)
    with BarProgress(quiet=quiet).task("reading headers", total=None) as advance:
        found = source.find(options, progress=lambda k: advance(1))
    rows = manifest_rows(found)
    files = {ref.scan_id: len(ref.files) for ref in found.selected}
    if out is not None:
        n = write_manifest(found, out)
        stderr.print(f"wrote {n} rows to {out}, and where their files lie to {locator_path(out)} (do not share it)")
    stderr.print(f"{len(found.selected)} selected, {len(found.skipped)} skipped")
    if as_json:
        print_json_lines([{k: v for k, v in r.items() if k not in ("files", "root", "location")} for r in rows])
        return
    print_table(
        [
            {
                "decision": r["decision"],
                "kind": r["kind"],
                "scan_id": r["scan_id"] or "",
                "source": r["source"],
                "files": files.get(r["scan_id"]) or "",
                "reason": f"{r['reason_code']}: {r['reason']}" if r["reason_code"] else ", ".join(r["flags"]),
            }
            for r in rows
        ],
        title=f"scan of {source.describe()}",
    )
