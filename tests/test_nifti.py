"""NIfTI loading: RAS reorientation without copies, and a clear VolumeError for each bad input."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import head_phantom_xyz, write_nifti

from hctembed.io import nifti
from hctembed.io.archive import load_volume
from hctembed.io.nifti import load_nifti
from hctembed.volume import VolumeError


def _lps_twin(hu_xyz: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with x and y flipped (LPS+ voxel axes), same world positions."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = hu_xyz.shape[0] - 1
    flip[1, 3] = hu_xyz.shape[1] - 1
    return hu_xyz[::-1, ::-1, :].copy(), affine @ flip


def test_ras_file_loads_as_zyx_view(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(20, 24, 10), spacing=(1.0, 1.0, 3.0))
    v = load_nifti(write_nifti(tmp_path / "a.nii.gz", hu, affine))
    assert v.array.shape == (10, 24, 20)
    assert v.array.dtype == np.float32
    np.testing.assert_array_equal(v.array, hu.transpose(2, 1, 0))
    np.testing.assert_allclose(v.affine, affine, atol=1e-5)
    assert v.spacing_xyz == pytest.approx((1.0, 1.0, 3.0), abs=1e-5)
    assert v.meta["source_axcodes"] == "RAS"


def test_lps_and_ras_twins_load_identically(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(20, 24, 10), spacing=(0.8, 0.9, 3.0))
    lps_hu, lps_affine = _lps_twin(hu, affine)
    assert nib.aff2axcodes(lps_affine) == ("L", "P", "S")
    a = load_nifti(write_nifti(tmp_path / "ras.nii.gz", hu, affine))
    b = load_nifti(write_nifti(tmp_path / "lps.nii.gz", lps_hu, lps_affine))
    assert b.meta["source_axcodes"] == "LPS"
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_permuted_axes_are_reoriented(tmp_path):
    """A file stored as [z, x, y] (sagittal-style) still loads as RAS [Z, Y, X]."""
    hu, affine = head_phantom_xyz(shape_xyz=(20, 24, 10), spacing=(1.0, 1.0, 3.0))
    perm = np.zeros((4, 4))
    perm[3, 3] = 1
    perm[2, 0] = perm[0, 1] = perm[1, 2] = 1  # new axis 0 -> z, 1 -> x, 2 -> y
    stored = hu.transpose(2, 0, 1).copy()
    v = load_nifti(write_nifti(tmp_path / "perm.nii.gz", stored, affine @ perm))
    np.testing.assert_array_equal(v.array, hu.transpose(2, 1, 0))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: (np.zeros((8, 8, 8, 2), np.int16), np.eye(4)), "not a 3D volume"),
        (lambda: (np.zeros((8, 8), np.int16), np.eye(4)), "not a 3D volume"),
        (lambda: (np.zeros((8, 8, 1), np.int16), np.eye(4)), "singleton"),
        (lambda: (np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), "non-finite"),
        (lambda: (np.zeros((8, 8, 8), np.int16), np.diag([1.0, 0.0, 1.0, 1.0])), "affine"),
        (
            lambda: (
                np.zeros((8, 8, 8), np.int16),
                np.array([[1, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
            ),
            "non-orthonormal",
        ),
    ],
    ids=["4d", "2d", "singleton", "nan", "degenerate-affine", "sheared-affine"],
)
def test_bad_volumes_raise_volume_error(tmp_path, make, message):
    data, affine = make()
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_qform(np.eye(4), code=0)
    img.set_sform(affine, code=1)
    path = tmp_path / "bad.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(VolumeError, match=message):
        load_nifti(path)


def test_4d_with_one_volume_is_accepted(tmp_path):
    hu, affine = head_phantom_xyz(shape_xyz=(12, 12, 6), spacing=(1.0, 1.0, 2.0))
    v = load_nifti(write_nifti(tmp_path / "one.nii.gz", hu[..., None], affine))
    assert v.array.shape == (6, 12, 12)


def test_unreadable_files(tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_text("hello, not an image")
    with pytest.raises(VolumeError, match="unreadable"):
        load_nifti(text)
    hu, affine = head_phantom_xyz(shape_xyz=(32, 32, 16), spacing=(1.0, 1.0, 2.0))
    good = write_nifti(tmp_path / "good.nii.gz", hu, affine)
    raw = gzip.decompress(good.read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(VolumeError, match="unreadable"):
        load_nifti(truncated)
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(VolumeError):
        load_nifti(empty)
    with pytest.raises(VolumeError, match="not found"):
        load_volume(tmp_path / "missing.nii.gz")
    other = tmp_path / "report.txt"
    other.write_text("x")
    with pytest.raises(VolumeError, match="unsupported"):
        load_volume(other)


def test_missing_world_geometry_is_refused(tmp_path):
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4))
    img.set_sform(np.eye(4), code=0)
    img.set_qform(np.eye(4), code=0)
    path = tmp_path / "nogeom.nii"
    nib.save(img, str(path))
    with pytest.raises(VolumeError, match="no sform or qform"):
        load_nifti(path)


def test_scaled_int16_becomes_hu(tmp_path):
    img = nib.Nifti1Image(np.full((8, 8, 8), 100, np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    img.set_sform(np.eye(4), code=1)
    path = tmp_path / "scaled.nii"
    nib.save(img, str(path))
    v = load_nifti(path)
    assert v.array.dtype == np.float32
    assert float(v.array[0, 0, 0]) == pytest.approx(100 * 2.0 - 1024.0)


def test_sform_wins_over_a_disagreeing_qform(tmp_path, caplog):
    hu, affine = head_phantom_xyz(shape_xyz=(12, 12, 6), spacing=(1.0, 1.0, 2.0))
    img = nib.Nifti1Image(hu, affine)
    shifted = affine.copy()
    shifted[:3, 3] += [10.0, 0.0, 0.0]
    img.set_qform(shifted, code=1)
    img.set_sform(affine, code=1)
    path = tmp_path / "disagree.nii.gz"
    nib.save(img, str(path))
    v = load_nifti(path)
    np.testing.assert_allclose(v.affine, affine, atol=1e-5)
    assert "disagree" in caplog.text


@pytest.mark.parametrize(
    "dtype, slope, inter",
    [(np.int16, 1.0, 0.0), (np.int16, 0.5, -1024.0), (">i2", 1.0, 0.0), (np.float32, 1.0, 0.0), (np.uint8, 4.0, -1000)],
)
def test_fast_inflate_reads_what_nibabel_reads(tmp_path, monkeypatch, dtype, slope, inter):
    hu, affine = head_phantom_xyz(shape_xyz=(40, 36, 12), spacing=(1.0, 1.0, 2.5))
    stored = np.clip(hu, 0, 255) if np.dtype(dtype) == np.uint8 else hu
    img = nib.Nifti1Image(stored.astype(dtype), affine)
    img.header.set_slope_inter(slope, inter)
    img.set_sform(affine, code=1)
    path = tmp_path / "x.nii.gz"
    nib.save(img, str(path))
    expected = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float64), np.float32)  # nibabel's scaling
    fast = load_nifti(path)
    monkeypatch.setattr(nifti, "_igzip", None)  # the zlib path through nibabel
    slow = load_nifti(path)
    np.testing.assert_array_equal(fast.array, slow.array)
    np.testing.assert_allclose(fast.array.transpose(2, 1, 0), expected, rtol=1e-6, atol=1e-3)
    assert fast.array.flags.writeable and fast.array.dtype == np.float32
