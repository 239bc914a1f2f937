"""Hostile inputs cost only their own scan: headers that claim huge images fail before anything that size is
allocated, a gzip stream longer than its header says is never held, and a loader process that dies (killed
for memory, a crash in a decoder) fails the scan that killed it while the run goes on."""

from __future__ import annotations

import gzip
import os
import resource
import signal
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import head_phantom_xyz, write_nifti
from dicom_factory import SeriesSpec, write_series

import hctembed.embed as embed_module
import hctembed.scan_loading as loading_module
from hctembed.index.store import Store
from hctembed.io.archive import load_volume, scan_archive
from hctembed.io.dicom import load_dicom_series
from hctembed.io.nifti import _inflate_at_most, load_nifti
from hctembed.model.encoders import load_encoder
from hctembed.volume import VolumeError


def nifti_header(shape_xyz: tuple[int, int, int], *, datatype: int = 4, bitpix: int = 16) -> bytes:
    """A 348-byte NIfTI-1 header (+4 bytes extension flag) claiming ``shape_xyz`` int16 voxels at 1 mm."""
    h = bytearray(352)
    struct.pack_into("<i", h, 0, 348)
    struct.pack_into("<8h", h, 40, 3, *shape_xyz, 1, 1, 1, 1)
    struct.pack_into("<hh", h, 70, datatype, bitpix)
    struct.pack_into("<8f", h, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", h, 108, 352.0)  # vox_offset
    struct.pack_into("<ff", h, 112, 1.0, 0.0)  # scl_slope, scl_inter
    struct.pack_into("<hh", h, 252, 0, 1)  # qform_code 0, sform_code 1
    for row, values in enumerate(((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0))):
        struct.pack_into("<4f", h, 280 + 16 * row, *values)
    h[344:348] = b"n+1\0"
    return bytes(h)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_header_claiming_a_huge_image_fails_before_allocating_it(tmp_path):
    bomb = tmp_path / "huge.nii.gz"
    bomb.write_bytes(gzip.compress(nifti_header((32767, 32767, 32767))))  # 64 TiB of int16 claimed
    assert bomb.stat().st_size < 200
    before = peak_rss_mb()
    with pytest.raises(VolumeError, match=r"claims 35,181,150,961,663 voxels .* over the limit"):
        load_nifti(bomb)
    plain = tmp_path / "huge.nii"
    plain.write_bytes(nifti_header((4000, 4000, 4000)))
    with pytest.raises(VolumeError, match="over the limit"):
        load_volume(plain)
    within = tmp_path / "truncated.nii"  # legal size, but the file holds none of its voxels
    within.write_bytes(nifti_header((64, 64, 64)))
    with pytest.raises(VolumeError, match="truncated"):
        load_nifti(within)
    assert peak_rss_mb() - before < 200


def test_a_gzip_stream_longer_than_its_header_is_never_held(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 40, 20), spacing=(4.0, 4.0, 8.0))
    good = write_nifti(tmp_path / "good.nii.gz", hu, affine)
    reference = load_nifti(good).array.copy()
    # the same file with 256 MB of zeros after the voxels: a few hundred kB on disk
    raw = gzip.decompress(good.read_bytes())
    padded = tmp_path / "padded.nii.gz"
    with gzip.open(padded, "wb", compresslevel=9) as f:
        f.write(raw)
        zeros = bytes(1 << 24)
        for _ in range(16):
            f.write(zeros)
    assert padded.stat().st_size < 2_000_000
    buffer = _inflate_at_most(padded, len(raw))
    assert len(buffer) == len(raw) and buffer.tobytes() == raw
    before = peak_rss_mb()
    np.testing.assert_array_equal(load_nifti(padded).array, reference)
    assert peak_rss_mb() - before < 100  # not the 256 MB the stream holds
    with pytest.raises(VolumeError, match="over the limit of 1,000"):
        load_nifti(good, max_voxels=1000)


def test_dicom_headers_claiming_huge_images_fail_before_decoding(tmp_path):
    spec = SeriesSpec()
    paths = write_series(tmp_path / "s", spec)
    found = scan_archive(tmp_path / "s")
    ref = found.selected[0]
    assert load_dicom_series(ref.root, ref.files).array.shape[0] == spec.n
    with pytest.raises(VolumeError, match="in all"):  # the slices of 48 x 48 are over a limit of 10,000
        load_dicom_series(ref.root, ref.files, max_voxels=10_000)
    ds = pydicom.dcmread(paths[2])
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 5000
    ds.save_as(paths[2])
    with pytest.raises(VolumeError, match="a slice header claims"):
        load_dicom_series(ref.root, ref.files)


def _archive(tmp_path: Path, n: int = 4) -> Path:
    root = tmp_path / "archive"
    root.mkdir()
    for i in range(n):
        hu, affine = head_phantom_xyz(shape_xyz=(40, 40, 20), spacing=(4.0, 4.0, 8.0), seed=i)
        write_nifti(root / f"scan{i}.nii.gz", hu, affine)
    return root


def _embed(root: Path, db: Path, *, workers: int):
    refs = scan_archive(root).selected
    encoder = load_encoder("vit-micro", seed=0)
    with Store(db) as store:
        return embed_module.embed_archive(refs=refs, encoder=encoder, store=store, batch_size=2, num_workers=workers)


def test_a_huge_header_in_an_archive_fails_only_its_scan_and_a_rerun_goes_on(tmp_path):
    root = _archive(tmp_path, n=3)
    (root / "huge.nii.gz").write_bytes(gzip.compress(nifti_header((32767, 32767, 32767))))
    db = tmp_path / "h.duckdb"
    report = _embed(root, db, workers=1)
    assert report.embedded == 3 and [src for src, _ in report.failed] == ["huge.nii.gz"]
    assert "over the limit" in report.failed[0][1]
    again = _embed(root, db, workers=0)
    assert again.embedded == 0 and again.unchanged == 3 and "unchanged since it failed" in again.failed[0][1]


def test_a_loader_process_that_dies_costs_only_the_scan_that_killed_it(tmp_path, monkeypatch):
    root = _archive(tmp_path, n=5)
    real_prepare = loading_module.prepare

    def prepare_or_die(ref, **kwargs):  # a decoder crash / an OOM kill, in the worker process only
        if ref.scan_id == "scan2" and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        if ref.scan_id == "scan4":
            raise MemoryError  # a scan too large for this machine: its failure, not the run's
        return real_prepare(ref, **kwargs)

    parent = os.getpid()
    monkeypatch.setattr(loading_module, "prepare", prepare_or_die)  # workers are forked: they see it too
    db = tmp_path / "h.duckdb"
    report = _embed(root, db, workers=1)
    failed = dict(report.failed)
    assert report.embedded == 3 and set(failed) == {"scan2.nii.gz", "scan4.nii.gz"}
    assert "loader process died" in failed["scan2.nii.gz"] and "MemoryError" in failed["scan4.nii.gz"]
    with Store(db, read_only=True) as store:
        collection = store.resolve_collection()
        assert sorted(collection.vectors()[2]) == ["scan0", "scan1", "scan3"]
        assert collection.status()["scan2.nii.gz"].status == "failed"
    again = _embed(root, db, workers=1)  # the killer is not tried again: the re-run does not die on it
    assert again.embedded == 0 and again.unchanged == 3
