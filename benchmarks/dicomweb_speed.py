"""Embedding-time input from a PACS against the same files on disk, measured in the same run.

A real Orthanc with its DICOMweb plugin (Debian ``orthanc``, ``orthanc-dicomweb``) is started on a loopback port
with a temporary storage folder; the same series are uploaded to it and written to a folder:

* synthetic head series (pydicom, ``--series`` of ``--slices`` slices at ``--matrix``²), and
* the shared real Philips head series (``../shared/data/dcm_qa_ct_philips``, 28 files of 5 mm and 54 tilted files
  of 2.5 mm at 512²), when present.

Each round lists the candidates (``scan_archive`` of the folder; QIDO-RS + instance metadata of the PACS) and turns
every selected series into the model input (``prepare``: read or WADO-RS fetch, assemble, preprocess), from disk
and from the PACS in alternating order; the best of ``--rounds`` rounds is reported as series per second and
CPU-seconds per series, with the PACS's throughput as a share of the disk's (issue 29's target: >= 0.7). One torch
thread, so that the comparison is of I/O paths, not of parallelism.

    .venv/bin/python benchmarks/dicomweb_speed.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' Orthanc launcher and phantom

PHILIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcm_qa_ct_philips"


def run_round(find, *, config) -> tuple[float, float, int]:
    """(wall s, CPU s, series) of listing and preparing every selected series once."""
    from hctembed.preprocessing.series import prepare

    wall, cpu = time.perf_counter(), time.process_time()
    refs = find().selected
    for ref in refs:
        prepare(ref, config=config)
    return time.perf_counter() - wall, time.process_time() - cpu, len(refs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from dicom_factory import SeriesSpec, write_series
    from pacs_server import PASSWORD, USER, Orthanc, missing_reason

    from hctembed.io.archive import scan_archive
    from hctembed.io.dicomweb import DicomWebServer
    from hctembed.io.pseudonym import Pseudonymizer
    from hctembed.io.sources import DicomWebSource, FindOptions
    from hctembed.model.encoders import REGISTRY

    reason = missing_reason()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    work = Path(tempfile.mkdtemp(prefix="hctembed-dicomweb-speed-"))
    folder = work / "archive"
    spacing = 200.0 / args.matrix
    for i in range(args.series):
        write_series(folder / f"s{i}", SeriesSpec(n=args.slices, rows=args.matrix, cols=args.matrix, spacing=spacing,
                                                  step=4.0, thickness=4.0, seed=i,
                                                  origin=(-100.0, -100.0, -80.0)))  # fmt: skip
    if PHILIPS.is_dir():
        for series in ("S21570/S2010", "S21610/S2010"):  # the slice files (not the scanner's DIRFILE index)
            shutil.copytree(PHILIPS / series, folder / "philips" / series.replace("/", "_"),
                            ignore=lambda _, names: [n for n in names if not n.startswith("I")])  # fmt: skip
    pacs = Orthanc(work / "orthanc").start()
    try:
        pacs.upload(sorted(p for p in folder.rglob("*") if p.is_file()))
        auth = work / "auth.json"
        auth.write_text(json.dumps({"username": USER, "password": PASSWORD}))
        secret = Pseudonymizer(b"benchmark-secret-benchmark-secret")
        source = DicomWebSource(DicomWebServer.parse("dicomweb+" + pacs.dicomweb, auth_file=auth))
        config = REGISTRY["vit-base"].preprocess
        options = FindOptions()
        from hctembed.io import archive as archive_module

        def from_pacs():
            return archive_module.scan_dicomweb(source.server, pseudonyms=secret, limits=options.limits)

        def from_disk():
            return scan_archive(folder, pseudonyms=secret)

        assert len(from_pacs().selected) == len(from_disk().selected), "the PACS and the folder differ"
        best = {"disk": None, "pacs": None}
        for r in range(args.rounds):
            order = (("disk", from_disk), ("pacs", from_pacs)) if r % 2 == 0 else (("pacs", from_pacs),
                                                                                   ("disk", from_disk))  # fmt: skip
            for name, find in order:
                wall, cpu, n = run_round(find, config=config)
                if best[name] is None or wall < best[name][0]:
                    best[name] = (wall, cpu, n)
    finally:
        pacs.stop()
        shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for name, (wall, cpu, n) in best.items():
        rows[name] = {"series": n, "wall_s": round(wall, 3), "series_per_s": round(n / wall, 2),
                      "cpu_s_per_series": round(cpu / n, 3)}  # fmt: skip
    ratio = rows["pacs"]["series_per_s"] / rows["disk"]["series_per_s"]
    philips = "+ the 2 Philips series " if PHILIPS.is_dir() else ""
    print(
        f"{args.series} synthetic series of {args.slices} x {args.matrix}² {philips}(best of {args.rounds} rounds, "
        "1 thread)"
    )
    print("| source | series | wall s | series/s | CPU s per series |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['series']} | {row['wall_s']} | {row['series_per_s']} | {row['cpu_s_per_series']} |")
    print(f"PACS throughput / disk throughput: {ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratio": round(ratio, 3), "settings": vars(args)}, default=str))


if __name__ == "__main__":
    main()
