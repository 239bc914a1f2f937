"""Streamed .nii.gz preprocessing (inflate in a thread, resample slab by slab) against loading whole first."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import head_phantom_xyz, write_nifti

from hctembed.config import PreprocessConfig
from hctembed.io import nifti_stream
from hctembed.io.archive import discover
from hctembed.io.nifti import load_nifti
from hctembed.io.nifti_stream import INFLATE_THREAD, open_stream
from hctembed.preprocessing import preprocess, preprocess_stream
from hctembed.preprocessing.series import prepare
from hctembed.volume import VolumeError

CONFIG = PreprocessConfig()


def _oblique(affine: np.ndarray, degrees: float) -> np.ndarray:
    t = np.radians(degrees)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]
    return rot @ affine


def _write(path, hu, affine, *, dtype=np.int16, slope=1.0, inter=0.0):
    img = nib.Nifti1Image(hu.astype(dtype), affine)
    img.header.set_slope_inter(slope, inter)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture(autouse=True)
def small_reads(monkeypatch):
    """4 KiB reads: slabs are handed out while the file is still being inflated (the real files' case)."""
    monkeypatch.setattr(nifti_stream, "CHUNK", 4096)


@pytest.mark.parametrize(
    "case",
    ["ras", "lps", "flipped_slices", "oblique", "scaled_uint8", "float32", "big_endian"],
)
def test_streamed_equals_whole(tmp_path, case):
    hu, affine = head_phantom_xyz(shape_xyz=(70, 64, 30), spacing=(3.0, 3.2, 5.0), seed=2)
    kw = {}
    if case == "lps":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [hu.shape[0] - 1, hu.shape[1] - 1]
        hu, affine = hu[::-1, ::-1].copy(), affine @ flip
    elif case == "flipped_slices":
        flip = np.diag([1.0, 1.0, -1.0, 1.0])
        flip[2, 3] = hu.shape[2] - 1
        hu, affine = hu[:, :, ::-1].copy(), affine @ flip
    elif case == "oblique":
        affine = _oblique(affine, 7.0)
    elif case == "scaled_uint8":
        hu = np.clip((hu + 1024) // 8, 0, 255)
        kw = dict(dtype=np.uint8, slope=8.0, inter=-1024.0)
    elif case == "float32":
        kw = dict(dtype=np.float32)
    elif case == "big_endian":
        kw = dict(dtype=">i2")
    path = _write(tmp_path / "x.nii.gz", hu, affine, **kw)
    stream = open_stream(path)
    assert stream is not None
    whole = preprocess(load_nifti(path), config=CONFIG)
    streamed = preprocess_stream(stream, config=CONFIG)
    np.testing.assert_allclose(streamed.numpy(), whole.numpy(), atol=1e-6)


def test_slabs_cover_every_slice_once_in_order(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 23), spacing=(1.0, 1.0, 2.0))
    path = write_nifti(tmp_path / "x.nii.gz", hu, affine)
    slabs = list(open_stream(path).slabs(slices=5))
    firsts = [first for first, _ in slabs]
    sizes = [len(slab) for _, slab in slabs]
    assert len(slabs) > 4 and max(sizes) <= 5  # handed out as the file is inflated, 5 slices at most
    assert firsts == list(np.cumsum([0, *sizes[:-1]])) and sum(sizes) == 23
    stacked = np.concatenate([s for _, s in slabs])  # [z, y, x]
    np.testing.assert_array_equal(stacked, hu.transpose(2, 1, 0).astype(np.float32))


def test_multi_member_gzip_is_read_whole(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 20), spacing=(1.0, 1.0, 2.0))
    plain = write_nifti(tmp_path / "x.nii", hu, affine)
    raw = plain.read_bytes()
    cut = len(raw) // 3
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]))
    streamed = preprocess_stream(open_stream(tmp_path / "multi.nii.gz"), config=CONFIG)
    np.testing.assert_allclose(streamed.numpy(), preprocess(load_nifti(plain), config=CONFIG).numpy(), atol=1e-6)


def test_truncated_and_corrupt_files_are_volume_errors(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 20), spacing=(1.0, 1.0, 2.0))
    good = write_nifti(tmp_path / "good.nii.gz", hu, affine)
    raw = gzip.decompress(good.read_bytes())
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw[: len(raw) * 2 // 3]))
    with pytest.raises(VolumeError, match="truncated"):
        preprocess_stream(open_stream(short), config=CONFIG)
    data = bytearray(good.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # a damaged deflate stream
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="unreadable"):
        preprocess_stream(open_stream(corrupt), config=CONFIG)


def test_non_finite_float_voxels_are_refused(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 20), spacing=(1.0, 1.0, 2.0))
    hu = hu.astype(np.float32)
    hu[3, 4, 15] = np.nan
    path = _write(tmp_path / "nan.nii.gz", hu, affine, dtype=np.float32)
    with pytest.raises(VolumeError, match="non-finite"):
        preprocess_stream(open_stream(path), config=CONFIG)


def test_what_is_not_streamed_falls_back(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 20), spacing=(1.0, 1.0, 2.0))
    assert open_stream(write_nifti(tmp_path / "plain.nii", hu, affine)) is None
    # stored sagittally (axes permuted relative to RAS): loaded whole
    permuted = hu.transpose(2, 0, 1).copy()
    perm_affine = affine[:, [2, 0, 1, 3]]
    path = write_nifti(tmp_path / "sagittal.nii.gz", permuted, perm_affine)
    assert open_stream(path) is None
    (ref,) = discover(path)
    x, facts = prepare(ref, config=CONFIG)
    np.testing.assert_allclose(x.numpy(), preprocess(load_nifti(path), config=CONFIG).numpy(), atol=1e-6)
    assert facts["source_shape_xyz"] == [20, 40, 36]


def test_prepare_streams_and_reports_the_same_facts(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 20), spacing=(1.0, 1.0, 2.0))
    path = write_nifti(tmp_path / "x.nii.gz", hu, affine)
    (ref,) = discover(path)
    x, facts = prepare(ref, config=CONFIG)
    volume = load_nifti(path)
    np.testing.assert_allclose(x.numpy(), preprocess(volume, config=CONFIG).numpy(), atol=1e-6)
    assert facts == {
        **volume.meta,
        "shape_xyz": list(volume.shape_xyz),
        "spacing_xyz": [round(s, 4) for s in volume.spacing_xyz],
    }


def test_a_member_ending_on_a_read_boundary_does_not_end_the_file(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 20), spacing=(1.0, 1.0, 2.0))
    plain = write_nifti(tmp_path / "x.nii", hu, affine)
    raw = plain.read_bytes()
    cut = 4096 - 23  # a stored (level 0) member is its data + 23 bytes: exactly one 4 KiB read
    first = gzip.compress(raw[:cut], compresslevel=0, mtime=0)
    assert len(first) == 4096
    path = tmp_path / "multi.nii.gz"
    path.write_bytes(first + gzip.compress(raw[cut:]))
    streamed = preprocess_stream(open_stream(path), config=CONFIG)
    np.testing.assert_allclose(streamed.numpy(), preprocess(load_nifti(plain), config=CONFIG).numpy(), atol=1e-6)


def test_a_wrong_checksum_is_refused(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 20), spacing=(1.0, 1.0, 2.0))
    good = write_nifti(tmp_path / "good.nii.gz", hu, affine)
    data = bytearray(good.read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC32
    bad = tmp_path / "crc.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(VolumeError, match="unreadable"):
        preprocess_stream(open_stream(bad), config=CONFIG)


def test_stopping_early_stops_the_inflating_thread(tmp_path):
    """A consumer that gives up after the first slab (e.g. a later error) leaves no inflating thread behind. The
    file is noisy, so it is still being inflated when the consumer stops (~15 MB of ISA-L work)."""
    import threading

    _, affine = head_phantom_xyz(shape_xyz=(8, 8, 8), spacing=(1.0, 1.0, 1.0))
    noise = np.random.default_rng(0).integers(-1000, 1000, size=(256, 256, 120), dtype=np.int16)
    path = write_nifti(tmp_path / "x.nii.gz", noise, affine)

    def inflaters():
        return [t for t in threading.enumerate() if t.name == INFLATE_THREAD]

    slabs = open_stream(path).slabs(slices=1)
    next(slabs)
    slabs.close()  # the thread is told to stop and joined
    assert inflaters() == []
