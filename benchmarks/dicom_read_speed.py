"""Real scanner DICOM at the decode floor: CPU-seconds per series from the files to the model input, beside the
bare pixel read, the previous full pydicom read and MONAI's chain, measured in the same run.

Series: the shared real Philips head series (``../shared/data/dcm_qa_ct_philips``: 28 files of 5 mm and 54 of
2.5 mm with an 18.5° gantry tilt, 512², uncompressed, 125 tags a file, most of them private), the 5 mm files each
written five times 1 mm apart (140 real scanner files of a 1 mm series: only positions and UIDs changed), and a
synthetic 1 mm head written as 170 uncompressed files (512², few tags). For each, in this process with one torch thread,
the median CPU time (all threads) of ``--repeats`` calls after a warm-up:

* ``floor``: ``np.fromfile`` of every file's pixel bytes at offsets found beforehand, into one stack: the I/O
  and copy no reader can avoid;
* ``load``: ``load_dicom_series`` (sort, checks, zones/tilt), whose files take the native path
  (``hctembed/io/dicom_native.py``: header parsed once for the tags assembly needs, pixels read straight in). A
  regular series with one rescale keeps its stored words (``Volume.stored``: read into one buffer, converted to
  HU where ``prepare`` reads them); a zoned or tilted one is converted slice by slice here;
* ``load + HU``: ``load`` and then the whole volume in float32 HU (``Volume.array``): what a caller that wants
  the HU array pays, and what ``load`` cost before it kept the stored words;
* ``load, full read``: the same with the native path switched off (every tag parsed, pixels decoded by
  pydicom's handlers): what it cost before;
* ``prepare``: ``load`` plus the head check, the 1 mm resample, windows and crop (what ``embed`` runs);
* ``MONAI``: ``LoadImage(PydicomReader)`` of the series folder, then the paper's chain (Orientation, Spacing
  1 mm spline, windows, crop, resize).

Prints each and the ratios ``MONAI / prepare``, ``load / floor`` and ``load + HU / floor``; writes
``benchmarks/results/dicom_read_speed.json``.

    python benchmarks/dicom_read_speed.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

sys.path.insert(0, str(Path(__file__).parent))  # preprocess_speed's synthetic writers, beside this script

PHILIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcm_qa_ct_philips"


def cpu_median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def pixel_offsets(folder: Path, files: list[str]) -> list[tuple[Path, int, int, str]]:
    """(path, byte offset of the pixel values, their count, dtype) of each file, found with pydicom (untimed)."""
    out = []
    for name in files:
        path = folder / name
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            at = f.tell()
        explicit = ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        dtype = "<i2" if int(ds.PixelRepresentation) == 1 else "<u2"
        out.append((path, at + (12 if explicit else 8), int(ds.Rows) * int(ds.Columns), dtype))
    return out


def floor_read(offsets, shape) -> np.ndarray:
    stack = np.empty((len(offsets), *shape), np.uint16)
    for k, (path, offset, count, dtype) in enumerate(offsets):
        stack[k] = np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape).view(np.uint16)
    return stack


def philips_at_1mm(folder: Path, source: Path) -> Path:
    """The real Philips 5 mm slices, each written five times 1 mm apart (new positions, SOP UIDs and instance
    numbers; every other element, the private ones included, as the scanner wrote it): a 1 mm series of 140 real
    scanner files, the kind issue 31 measured, which the shared data do not hold."""
    from pydicom.uid import generate_uid

    folder.mkdir()
    slices = sorted((pydicom.dcmread(p) for p in source.glob("I*")), key=lambda ds: float(ds.ImagePositionPatient[2]))
    z0 = float(slices[0].ImagePositionPatient[2])
    for i in range(5 * len(slices)):
        ds = slices[i // 5]
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z0 + i * 1.0]
        ds.SliceLocation = z0 + i * 1.0
        ds.InstanceNumber = i + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SliceThickness = 1.0
        ds.save_as(folder / f"I{i:04d}", enforce_file_format=True)
    return folder


def series_cases(tmp: Path) -> list[tuple[str, Path]]:
    """(name, a folder holding only the series' slice files) for each series measured."""
    from preprocess_speed import write_case, write_dicom_series

    cases = []
    for series, label in (("S21570/S2010", "Philips 5 mm"), ("S21610/S2010", "Philips 2.5 mm, 18.5° tilt")):
        source = PHILIPS / series
        if not source.is_dir():
            continue
        folder = tmp / series.replace("/", "-")
        folder.mkdir()
        for path in sorted(source.glob("I*")):  # the slices (the folder also holds a DIRFILE)
            shutil.copy(path, folder / path.name)
        cases.append((f"{label} ({len(list(folder.iterdir()))} files)", folder))
    if (PHILIPS / "S21570" / "S2010").is_dir():
        folder = philips_at_1mm(tmp / "philips-headers-1mm", PHILIPS / "S21570" / "S2010")
        cases.append((f"Philips files at 1 mm ({len(list(folder.iterdir()))} files)", folder))
    _, hu, affine = write_case(tmp, matrix=512, thickness=1.0, seed=1)
    axial = np.diag([*np.linalg.norm(affine[:3, :3], axis=0), 1.0])
    axial[:3, 3] = affine[:3, 3]
    folder = tmp / "synthetic-1mm"
    files = write_dicom_series(folder, hu=hu, affine=axial)
    cases.append((f"synthetic 1 mm ({len(files)} files)", folder))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    from hctembed.config import PreprocessConfig
    from hctembed.io import dicom as dicom_module
    from hctembed.io.archive import scan_archive
    from hctembed.io.dicom import load_dicom_series
    from hctembed.preprocessing.paper import reference_chain
    from hctembed.preprocessing.series import prepare

    os.environ.setdefault("HCTEMBED_SECRET", str(Path(tempfile.gettempdir()) / "hctembed-bench-secret.key"))
    config = PreprocessConfig()
    chain = reference_chain(config)
    loader = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True)
    native = dicom_module.read_native
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in series_cases(Path(tmp)):
            ref = max(scan_archive(folder).selected, key=lambda r: len(r.files))
            offsets = pixel_offsets(ref.root, list(ref.files))
            first = pydicom.dcmread(ref.root / ref.files[0], stop_before_pixels=True)
            shape = (int(first.Rows), int(first.Columns))

            def full(ref=ref):
                dicom_module.read_native = lambda source: None
                try:
                    return load_dicom_series(ref.root, ref.files)
                finally:
                    dicom_module.read_native = native

            steps = {
                "floor": lambda offsets=offsets, shape=shape: floor_read(offsets, shape),
                "load": lambda ref=ref: load_dicom_series(ref.root, ref.files),
                "load + HU": lambda ref=ref: load_dicom_series(ref.root, ref.files).array,
                "load, full read": full,
                "prepare": lambda ref=ref: prepare(ref, config=config, head_check=True),
                "MONAI": lambda folder=folder: chain(loader(str(folder))),
            }
            for step in steps.values():  # warm-up: imports, weights per geometry, allocator
                step()
            seconds = {key: cpu_median(step, args.repeats) for key, step in steps.items()}
            row = {
                "series": name,
                "files": len(ref.files),
                **{f"{k}_cpu_s": round(v, 3) for k, v in seconds.items()},
                "monai_over_prepare": round(seconds["MONAI"] / seconds["prepare"], 1),
                "load_over_floor": round(seconds["load"] / seconds["floor"], 2),
                "load_hu_over_floor": round(seconds["load + HU"] / seconds["floor"], 2),
                "full_read_over_load": round(seconds["load, full read"] / seconds["load"], 2),
            }
            rows.append(row)
            print(
                f"{name:40} floor {seconds['floor']:.3f}  load {seconds['load']:.3f} (+HU {seconds['load + HU']:.3f}) "
                f"(full read {seconds['load, full read']:.3f}, {row['full_read_over_load']:.1f}x)  prepare "
                f"{seconds['prepare']:.3f}  MONAI {seconds['MONAI']:.3f}  -> {row['monai_over_prepare']:.1f}x MONAI, "
                f"load {row['load_over_floor']:.2f}x the floor (+HU {row['load_hu_over_floor']:.2f}x)  (CPU-s)",
                flush=True,
            )
    facts = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_average_at_end": os.getloadavg()[0],
    }
    out = Path(__file__).parent / "results" / "dicom_read_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
