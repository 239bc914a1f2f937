"""Small files that cost a careless server a lot: the uploads of issue 27's table, built in memory in a second or
two (the largest is a few hundred kB). ``tests/test_serve_hostile.py`` and ``serve_load.py --hostile`` send them;
``python benchmarks/hostile_payloads.py OUT`` writes them into OUT to try by hand (``curl -F file=@OUT/...``).

Each payload: ``(file name, bytes, words the server's 400 answer must hold)``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def dicom_header(*, rows: int = 8, cols: int = 8) -> bytes:
    """One CT slice (zeros) as DICOM bytes, written by pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns, ds.PixelSpacing = rows, cols, [1.0, 1.0]
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = bytes(rows * cols * 2)
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def zip_bomb(inflated_mb: int = 512) -> bytes:
    """A zip of one DICOM member: a real header, then ``inflated_mb`` MB of zeros (a few hundred kB on disk)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("slice.dcm", "w", force_zip64=True) as out:
        out.write(dicom_header())
        zeros = bytes(1 << 24)
        for _ in range(inflated_mb // 16):
            out.write(zeros)
    return buffer.getvalue()


def nifti(shape, zooms, *, dtype=np.int16, gz: bool = True, data_bytes: int | None = None) -> bytes:
    """A NIfTI-1 file declaring ``shape`` at ``zooms`` mm (``dtype``, or a NIfTI datatype code such as 128 for
    RGB24), with ``data_bytes`` of zero voxels (default: all the header declares)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms(zooms)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    header["vox_offset"] = 352
    size = data_bytes if data_bytes is not None else int(np.prod(shape)) * header.get_data_dtype().itemsize
    raw = header.binaryblock + b"\0" * 4 + bytes(size)
    return gzip.compress(raw, 1) if gz else raw


def many_members(n: int = 8000) -> bytes:
    """A zip of ``n`` one-byte members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i in range(n):
            zf.writestr(f"m{i:05d}.dcm", b"x")
    return buffer.getvalue()


def gzip_bomb(zeros_mb: int = 256) -> bytes:
    """A small head-sized NIfTI and then ``zeros_mb`` MB of zeros in the same gzip member."""
    voxels = np.full((16, 16, 8), 40, np.int16)
    raw = nifti((16, 16, 8), (10.0, 10.0, 10.0), gz=False, data_bytes=0) + voxels.tobytes(order="F")
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as f:
        f.write(raw)
        zeros = bytes(1 << 24)
        for _ in range(zeros_mb // 16):
            f.write(zeros)
    return out.getvalue()


def payloads() -> dict[str, tuple[str, bytes, str]]:
    """Issue 27's rows as uploads: name -> (file name, bytes, words of the expected 400)."""
    return {
        # 1: one DICOM member that inflates to 512 MB: refused from the zip's directory
        "zip bomb": ("q.zip", zip_bomb(512), "inflates"),
        # 2: 32 x 32 x 20 voxels of 156 mm: its 1 mm grid would be 4,837 x 4,837 x 20
        "huge voxels": ("q.nii.gz", nifti((32, 32, 20), (156.0, 156.0, 1.0)), "resampled to 1 mm"),
        # 3: a header declaring 1024 x 1024 x 1000 (the voxels never sent)
        "huge header": ("q.nii.gz", nifti((1024, 1024, 1000), (1.0, 1.0, 1.0), data_bytes=4096), "voxels"),
        # 4a: 8,000 one-byte members
        "many members": ("q.zip", many_members(8000), "members"),
        # 4b / 14: a small head, then 256 MB of zeros in the same gzip member
        "gzip bomb": ("q.nii.gz", gzip_bomb(256), "gzip bomb"),
        # 13: RGB voxels are bad input, not a bug
        "rgb": ("q.nii", nifti((8, 8, 8), (1.0, 1.0, 1.0), dtype=128, gz=False), "RGB"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for what, (name, data, _) in payloads().items():
        path = args.out / f"{what.replace(' ', '-')}-{name}"
        path.write_bytes(data)
        print(f"{path}  {len(data):,} bytes")


if __name__ == "__main__":
    main()
