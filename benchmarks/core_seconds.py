"""Core-seconds per scan: where each CPU-second of preprocessing goes, and what keeping freed memory saves.

The figure that sizes a cluster is the CPU time one scan costs (all threads of the process), not wall time. For a
1 mm and a 5 mm 512x512 head written as int16 ``.nii.gz`` (0.45 mm in-plane) and the 1 mm one as a 170-file
DICOM series, a fresh child process with one torch thread (as each embedding DataLoader worker runs) measures,
median of ``--repeats`` after one warm-up call:

* ``total``: what ``embed`` runs per scan (``hctembed.preprocessing.series.prepare``, head check included);
* ``total, new geometry``: the same with the per-geometry spline weights dropped before each call (an archive
  whose scans all differ in matrix, spacing or slice count);
* stages, each timed alone on the same scan: NIfTI ``inflate`` (ISA-L, the whole file), ``load`` (inflate +
  voxels, as RAS, whole file); DICOM ``floor`` (``np.fromfile`` of every file's pixel bytes at offsets found
  beforehand: the read no DICOM reader can avoid), ``load`` (``load_dicom_series``: headers, pixels, sort,
  checks; a regular series keeps its stored words, which the resample converts to HU slab by slab); then
  ``resample`` (the separable spline onto the 1 mm grid), ``head check`` and ``finish`` (head box, pad/crop,
  windows, area average).

The streamed NIfTI path overlaps inflating with the in-plane products, so its stages add up to more than its
total wall time but about its CPU time. Each case runs twice, with glibc's default allocator and with
``hctembed.allocator.retain_freed_memory`` (what the CLI and the embedding workers set): the ratio is measured
in the same run. Writes ``benchmarks/results/core_seconds.json``.

    python benchmarks/core_seconds.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("nifti_1mm", "nifti_5mm", "dicom_1mm", "dicom_philips_5mm")  # the last when ../shared/data holds it


def cpu_median(fn, repeats: int, *, before=None) -> float:
    """Median process CPU time (s) of ``fn()`` over ``repeats`` calls; ``before()`` runs untimed first."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def child(case: str, folder: Path, *, repeats: int, retain: bool) -> dict:
    """Runs in a fresh process: every stage of ``case``, CPU-seconds per call."""
    import numpy as np
    import torch
    from isal import igzip

    from hctembed.allocator import retain_freed_memory
    from hctembed.config import PreprocessConfig
    from hctembed.head_check import image_looks_like_head
    from hctembed.io.archive import discover
    from hctembed.io.dicom import load_dicom_series
    from hctembed.io.nifti import load_nifti
    from hctembed.preprocessing import resample
    from hctembed.preprocessing.paper import finish
    from hctembed.preprocessing.series import prepare

    sys.path.insert(0, str(Path(__file__).parent))  # dicom_read_speed's floor, beside this script
    torch.set_num_threads(1)
    retained = retain_freed_memory() if retain else False
    config = PreprocessConfig()
    (ref,) = discover(folder / case if case.startswith("dicom") else folder / f"{case}.nii.gz")
    if case.startswith("dicom"):
        from dicom_read_speed import floor_read, pixel_offsets

        files = sorted(p for p in (folder / case).iterdir())
        offsets = pixel_offsets(folder / case, [f.name for f in files])
        shape = load_dicom_series(folder / case, [files[0].name, files[1].name]).voxels.shape[1:]

        def load():
            return load_dicom_series(folder / case, [f.name for f in files])

        def floor():
            return floor_read(offsets, shape)

        first = ("floor", floor)
    else:
        path = folder / f"{case}.nii.gz"

        def load():
            return load_nifti(path)

        def inflate():
            return igzip.decompress(path.read_bytes())

        first = ("inflate", inflate)
    volume = load()
    grid = resample.isotropic_grid(volume, spacing_mm=config.spacing_mm)
    hu = resample.resample_isotropic(volume, grid=grid)

    def run():
        return prepare(ref, config=config, head_check=True)

    def forget_weights():
        resample._axis_weights.cache_clear()
        resample._impulse_coefficients.cache_clear()

    run()  # warm-up: imports, first-call work
    stages = {
        "total": cpu_median(run, repeats),
        "total, new geometry": cpu_median(run, repeats, before=forget_weights),
        first[0]: cpu_median(first[1], repeats),
        "load": cpu_median(load, repeats),
        "resample": cpu_median(lambda: resample.resample_isotropic(volume, grid=grid), repeats),
        "head check": cpu_median(
            lambda: image_looks_like_head(np.asarray(hu), spacing_zyx=(config.spacing_mm,) * 3), repeats
        ),
        "finish": cpu_median(lambda: finish(hu, grid=grid, config=config), repeats),
    }
    return {"case": case, "retain": retain, "retained": retained, "shape_zyx": list(volume.voxels.shape),
            "cpu_s": {k: round(v, 4) for k, v in stages.items()}}  # fmt: skip


def write_cases(folder: Path) -> None:
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from preprocess_speed import write_case, write_dicom_series

    for thickness in (1.0, 5.0):
        path = write_case(folder, matrix=512, thickness=thickness, seed=1)[0]
        path.rename(folder / f"nifti_{thickness:g}mm.nii.gz")
    img = nib.load(str(folder / "nifti_1mm.nii.gz"))
    axial = np.diag([*np.linalg.norm(img.affine[:3, :3], axis=0), 1.0])  # as preprocess_speed's DICOM row
    axial[:3, 3] = img.affine[:3, 3]
    write_dicom_series(folder / "dicom_1mm", hu=np.asarray(img.dataobj), affine=axial)
    from dicom_read_speed import PHILIPS

    if (PHILIPS / "S21570" / "S2010").is_dir():
        (folder / "dicom_philips_5mm").mkdir()
        for path in sorted((PHILIPS / "S21570" / "S2010").glob("I*")):  # the slices, not the scanner's DIRFILE
            (folder / "dicom_philips_5mm" / path.name).write_bytes(path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=3, metavar=("CASE", "FOLDER", "RETAIN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, folder, retain = args.child
        print(json.dumps(child(case, Path(folder), repeats=args.repeats, retain=retain == "1")))
        return
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_cases(Path(tmp))
        cases = [c for c in CASES if not c.startswith("dicom") or (Path(tmp) / c).is_dir()]
        for case in cases:
            for retain in ("0", "1"):
                cmd = [sys.executable, __file__, "--repeats", str(args.repeats), "--child", case, tmp, retain]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{case} retain={retain}: {rows[-1]['cpu_s']}", file=sys.stderr)
    stages = list(dict.fromkeys(s for row in rows for s in row["cpu_s"]))  # NIfTI's inflate, DICOM's floor
    print("| case | allocator | " + " | ".join(f"{s} CPU s" for s in stages) + " |")
    print("|---" * (len(stages) + 2) + "|")
    for row in rows:
        label = "freed memory kept" if row["retain"] else "glibc default"
        print(f"| {row['case']} | {label} | " + " | ".join((f"{row['cpu_s'][s]:.3f}" if s in row["cpu_s"] else "–")
                                                         for s in stages) + " |")  # fmt: skip
    for case in cases:
        default, kept = (r["cpu_s"]["total"] for r in rows if r["case"] == case)
        print(f"{case}: {default:.3f} -> {kept:.3f} CPU s per scan with freed memory kept ({default / kept:.2f}x)")
        floor = [r["cpu_s"] for r in rows if r["case"] == case and "floor" in r["cpu_s"]]
        if floor:
            print(f"{case}: load / floor {floor[-1]['load'] / floor[-1]['floor']:.2f}x (freed memory kept)")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "repeats": args.repeats,
            "load_average_start": load_start}  # fmt: skip
    (results / "core_seconds.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
