"""Preprocessing speed: hctembed's fast path vs the plain MONAI chain, measured in the same run.

Writes synthetic 512x512xN head CTs (0.45 mm in-plane; 5 mm and 1 mm slices) as int16 ``.nii.gz`` and the
1 mm one also as a DICOM series (one uncompressed file per slice), and takes the shared real Philips 5 mm head
series (``../shared/data/dcm_qa_ct_philips``, 28 files, 125 tags each) when present, then times for each, median
of ``--repeats``:

* ``decode zlib``  nibabel load + zlib inflate + int16 -> float32 (what MONAI's ``LoadImage`` pays);
* ``decode``       the floor of hctembed's path: NIfTI - read + ISA-L inflate (``isal``) + int16 -> float32;
                   DICOM - ``np.fromfile`` of every file's pixel bytes at offsets found beforehand, into one
                   stack (the read no DICOM reader can avoid);
* ``fast``         hctembed's embedding path (``hctembed.preprocessing.series.prepare``, head check included): a
                   ``.nii.gz`` is resampled slab by slab while a background thread inflates it
                   (``preprocess_stream``; the head check looks at the 1 mm grid); DICOM is ``load_dicom_series``
                   + head check + ``preprocess`` (separable cubic spline);
* ``head check``   ``hctembed.head_check.image_looks_like_head`` alone, on the loaded volume (its share of fast);
* ``whole``        NIfTI only: ``load_nifti`` (whole file first) + ``preprocess``, the path before streaming;
* ``reference``    MONAI: ``LoadImage`` (nibabel / ``PydicomReader``) + Orientation -> Spacing(1 mm,
                   spline 3) -> CropForeground -> windows -> ResizeWithPadOrCrop(224) -> CenterSpatialCrop(192)
                   -> Resize(96, area).

Prints the speed-up (reference / fast), fast / decode, the CPU time of one fast call (process time, all
threads: the core-seconds a scan costs) and the mean |difference| between the two outputs; writes JSON to
``benchmarks/results/preprocess_speed.json``.

    python benchmarks/preprocess_speed.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from hctembed.config import PreprocessConfig
from hctembed.head_check import image_looks_like_head
from hctembed.io.archive import discover
from hctembed.io.dicom import load_dicom_series
from hctembed.io.nifti import load_nifti
from hctembed.preprocessing import preprocess
from hctembed.preprocessing.paper import reference_chain
from hctembed.preprocessing.series import check_head, prepare
from hctembed.synth import SynthConfig, make_patient, sample_protocol, save_nifti, synth_scan

LPS = np.diag([-1.0, -1.0, 1.0])
PHILIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcm_qa_ct_philips"


def write_case(folder: Path, *, matrix: int, thickness: float, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    patient = make_patient(patient_id="bench", subtypes=frozenset({"IPH", "SDH"}), rng=rng)
    config = SynthConfig(matrix=matrix, fov_mm=230.0, slice_thickness_mm=(thickness, thickness), max_rotation_deg=3.0)
    protocol = sample_protocol(rng=rng, config=config)
    hu, affine = synth_scan(patient=patient, protocol=protocol, rng=rng)
    path = folder / f"head_{matrix}_{thickness:g}mm.nii.gz"
    save_nifti(path, hu=hu, affine=affine)
    return path, hu, affine


def write_dicom_series(folder: Path, *, hu: np.ndarray, affine: np.ndarray) -> list[str]:
    """``hu [x, y, z]`` with a RAS ``affine`` as one CT file per slice (stored = HU + 1024, uint16)."""
    folder.mkdir(parents=True, exist_ok=True)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_dir, col_dir = (LPS @ affine[:3, :3] / spacing)[:, 0], (LPS @ affine[:3, :3] / spacing)[:, 1]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    names = []
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.Modality, ds.Manufacturer = "BENCH", "Bench^Head", "CT", "SYNTH"
        ds.SeriesDescription, ds.ImageType, ds.KVP = "HEAD 1mm", ["ORIGINAL", "PRIMARY", "AXIAL"], 120
        ds.InstanceNumber, ds.SliceThickness = k + 1, float(spacing[2])
        ds.ImagePositionPatient = [float(v) for v in LPS @ (affine @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        ds.PixelData = np.clip(hu[:, :, k].T.astype(np.int32) + 1024, 0, 65535).astype(np.uint16).tobytes()
        name = f"IM{k:05d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        names.append(name)
    return names


def dicom_case(name: str, series: Path, files: list[str], *, config, chain) -> tuple:
    """The timed functions of one DICOM series (no zlib decode, no whole-file path): the pixel-read floor, the
    embedding path, MONAI's PydicomReader chain and the head check."""
    from dicom_read_speed import floor_read, pixel_offsets
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    offsets = pixel_offsets(series, files)
    volume = load_dicom_series(series, files)
    shape = volume.voxels.shape[1:]

    def decode():
        return floor_read(offsets, shape)

    def fast():
        loaded = load_dicom_series(series, files)
        check_head(loaded.voxels, spacing_zyx=loaded.spacing_xyz[::-1])  # as prepare: samples converted, not all
        return preprocess(loaded, config=config)

    def head():
        return image_looks_like_head(volume.array, spacing_zyx=volume.spacing_xyz[::-1])

    loader = LoadImage(reader=PydicomReader(), image_only=True, ensure_channel_first=True)

    def reference():
        return chain(loader(str(series)))

    return (name, list(volume.shape_xyz), None, decode, None, fast, reference, head)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256x256 in-plane, one repeat (a smoke run)")
    args = parser.parse_args()
    matrix, repeats = (256, 1) if args.quick else (512, args.repeats)
    from isal import igzip
    from monai.transforms import LoadImage

    config = PreprocessConfig()
    chain = reference_chain(config)
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for thickness in (5.0, 1.0):
            path, hu, affine = write_case(Path(tmp), matrix=matrix, thickness=thickness, seed=1)
            img = nib.load(str(path))
            offset, dtype, shape = int(img.dataobj.offset), img.get_data_dtype(), img.shape

            def decode_zlib(path=path):
                return np.asanyarray(nib.load(str(path)).dataobj).astype(np.float32)

            def decode(path=path, offset=offset, dtype=dtype, shape=shape):
                buffer = igzip.decompress(path.read_bytes())
                voxels = np.frombuffer(buffer, dtype=dtype, count=int(np.prod(shape)), offset=offset)
                return voxels.reshape(shape, order="F").astype(np.float32)

            def whole(path=path):
                return preprocess(load_nifti(path), config=config)

            (ref,) = discover(path)

            def fast(ref=ref):
                return prepare(ref, config=config, head_check=True)[0]

            loaded = load_nifti(path)

            def head(volume=loaded):
                return image_looks_like_head(volume.array, spacing_zyx=volume.spacing_xyz[::-1])

            loader = LoadImage(image_only=True, ensure_channel_first=True)

            def reference(path=path, loader=loader):
                return chain(loader(str(path)))

            cases.append((path.name, list(shape), decode_zlib, decode, whole, fast, reference, head))
            if thickness == 1.0:
                series = Path(tmp) / "dicom_1mm"
                # axial geometry: MONAI 1.6's PydicomReader gives oblique series an identity affine (it warns
                # that IOP/IPP are "missing"), which would make the reference wrong, not slow
                axial = np.diag([*np.linalg.norm(affine[:3, :3], axis=0), 1.0])
                axial[:3, 3] = affine[:3, 3]
                files = write_dicom_series(series, hu=hu, affine=axial)

                cases.append(dicom_case(f"DICOM {len(files)} files", series, files, config=config, chain=chain))
        philips = PHILIPS / "S21570" / "S2010"
        if philips.is_dir():
            series = Path(tmp) / "philips_5mm"
            series.mkdir()
            files = []
            for path in sorted(philips.glob("I*")):  # the slices, not the scanner's DIRFILE
                (series / path.name).write_bytes(path.read_bytes())
                files.append(path.name)
            cases.append(dicom_case(f"Philips 5 mm {len(files)} files", series, files, config=config, chain=chain))
        for name, shape, decode_zlib, decode, whole, fast, reference, head in cases:
            assert head().is_head  # the synthetic head passes the check it is timed with
            fast()  # warm-up: imports, allocator
            t_zlib = timed(decode_zlib, repeats)[0] if decode_zlib else None
            t_whole = timed(whole, repeats)[0] if whole else None
            t_decode, _ = timed(decode, repeats)
            cpu_start = time.process_time()
            t_fast, x_fast = timed(fast, repeats)
            cpu = (time.process_time() - cpu_start) / repeats
            t_head = timed(head, repeats)[0]
            t_ref, x_ref = timed(reference, repeats)
            x_ref = x_ref.as_tensor().permute(0, 3, 2, 1)
            mad = float((x_fast - x_ref).abs().mean())
            rows.append(
                {
                    "file": name,
                    "shape_xyz": shape,
                    "decode_zlib_s": round(t_zlib, 3) if t_zlib is not None else None,
                    "decode_s": round(t_decode, 3),
                    "whole_s": round(t_whole, 3) if t_whole is not None else None,
                    "fast_s": round(t_fast, 3),
                    "reference_s": round(t_ref, 3),
                    "speedup": round(t_ref / t_fast, 1),
                    "fast_over_decode": round(t_fast / t_decode, 2),
                    "fast_cpu_s_per_scan": round(cpu, 2),
                    "head_check_s": round(t_head, 3),
                    "head_check_share": round(t_head / t_fast, 3),
                    "mean_abs_diff": mad,
                }
            )
            r = rows[-1]
            print(
                f"{r['file']:26} decode(zlib) {r['decode_zlib_s'] or float('nan'):6.3f} decode {r['decode_s']:6.3f} "
                f"whole {r['whole_s'] or float('nan'):6.3f} fast {r['fast_s']:6.3f} MONAI {r['reference_s']:6.3f}  "
                f"{r['speedup']:5.1f}x  "
                f"fast/decode {r['fast_over_decode']:5.2f}x  cpu-s {r['fast_cpu_s_per_scan']:5.2f}  "
                f"head check {r['head_check_s']:6.3f} ({100 * r['head_check_share']:.0f}% of fast)  "
                f"mean|Δ| {r['mean_abs_diff']:.2e}",
                flush=True,
            )
    facts = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "load_average_at_end": os.getloadavg()[0],
    }
    out = Path(__file__).parent / "results" / "preprocess_speed.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
