"""The native DICOM read path (hctembed/io/dicom_native.py) gives pydicom's values bit for bit, and whole series
the same volumes as pydicom's full read: written test series (explicit and implicit VR, signed and unsigned,
12 of 16 bits stored with stray high bits), a zip, and the shared real Philips series; what it does not handle
(compressed, multi-frame) falls back."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import SeriesSpec, write_series
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from hctembed.io import dicom as dicom_module
from hctembed.io.archive import scan_archive
from hctembed.io.dicom import load_dicom_series
from hctembed.io.dicom_native import read_native

PHILIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcm_qa_ct_philips"


def _rewrite(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    syntax = changes.pop("syntax", None)
    for key, value in changes.items():
        setattr(ds, key, value)
    if syntax is not None:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)


def _variants(tmp_path: Path) -> dict[str, list[Path]]:
    out = {"explicit signed": write_series(tmp_path / "a", SeriesSpec(n=12, seed=1))}
    implicit = write_series(tmp_path / "b", SeriesSpec(n=12, seed=2))
    for p in implicit:
        _rewrite(p, syntax=ImplicitVRLittleEndian)
    out["implicit"] = implicit
    unsigned = write_series(tmp_path / "c", SeriesSpec(n=12, seed=3))
    for p in unsigned:  # 12 of 16 bits, unsigned, with stray bits above the stored ones
        ds = pydicom.dcmread(p)
        raw = np.frombuffer(ds.PixelData, np.int16).astype(np.int32) + 1024
        words = (np.clip(raw, 0, 4095) | 0xA000).astype(np.uint16)
        ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
        ds.RescaleIntercept = -2048
        ds.PixelData = words.tobytes()
        ds.save_as(p, enforce_file_format=True)
    out["unsigned 12 bits, stray high bits"] = unsigned
    signed12 = write_series(tmp_path / "d", SeriesSpec(n=12, seed=4))
    for p in signed12:  # 12 of 16 bits, signed: the sign is bit 11
        ds = pydicom.dcmread(p)
        values = np.frombuffer(ds.PixelData, np.int16).astype(np.int32)
        words = (values & 0x0FFF) | 0x5000  # stray bits above the twelve
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = words.astype(np.uint16).tobytes()
        ds.save_as(p, enforce_file_format=True)
    out["signed 12 bits"] = signed12
    return out


def test_stored_values_equal_pydicoms_pixel_array(tmp_path):
    for what, paths in _variants(tmp_path).items():
        for path in paths:
            native = read_native(path)
            assert native is not None, what
            ds, where = native
            pixels = where.read()
            reference = pydicom.dcmread(path).pixel_array
            assert np.array_equal(where.read_into(np.full(where.shape, 7, where.dtype)), reference), what
            assert np.array_equal(read_native(path.read_bytes())[1].read(), reference), what  # bytes in memory
            assert pixels.dtype == reference.dtype and np.array_equal(pixels, reference), what
            assert {"ImagePositionPatient", "RescaleIntercept", "PixelSpacing"} <= set(ds)
            _same_header(ds, pydicom.dcmread(path, stop_before_pixels=True))


def _same_header(ds, reference) -> None:
    """Every tag the native header decoded has pydicom's value."""
    for keyword, value in ds.items():
        expected = reference.get(keyword)
        if keyword.endswith("Sequence"):
            assert keyword in reference
        elif isinstance(value, list):
            assert value == [float(v) for v in expected], keyword
        elif isinstance(value, str):
            assert value == str(expected), keyword
        else:
            assert value == expected and type(value)(expected) == value, keyword


def _both_ways(root: Path, files, monkeypatch) -> tuple:
    fast = load_dicom_series(root, files)
    with monkeypatch.context() as m:
        m.setattr(dicom_module, "read_native", lambda source: None)  # pydicom's full read, as before
        slow = load_dicom_series(root, files)
    return fast, slow


def _same(a, b) -> None:
    assert a.array.dtype == b.array.dtype and a.array.shape == b.array.shape
    assert np.array_equal(a.array.view(np.uint32), b.array.view(np.uint32))  # bit for bit, NaN-safe
    assert np.array_equal(a.affine, b.affine) and a.meta == b.meta


def test_volumes_are_bit_identical_to_the_full_read(tmp_path, monkeypatch):
    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    for paths in _variants(tmp_path).values():
        found = scan_archive(paths[0].parent)
        ref = found.selected[0]
        _same(*_both_ways(ref.root, ref.files, monkeypatch))
    # tilted, two zones, and inside a zip
    write_series(tmp_path / "tilt", SeriesSpec(n=16, tilt_deg=18.5, seed=5))
    ref = scan_archive(tmp_path / "tilt").selected[0]
    _same(*_both_ways(ref.root, ref.files, monkeypatch))
    paths = write_series(tmp_path / "z", SeriesSpec(n=12, seed=6))
    with zipfile.ZipFile(tmp_path / "s.zip", "w") as zf:
        for p in paths:
            zf.write(p, f"series/{p.name}")
    (tmp_path / "zipped").mkdir()
    (tmp_path / "s.zip").rename(tmp_path / "zipped" / "s.zip")
    ref = scan_archive(tmp_path / "zipped").selected[0]
    _same(*_both_ways(ref.root, ref.files, monkeypatch))


@pytest.mark.skipif(not PHILIPS.is_dir(), reason="the shared Philips series (../shared/data) is absent")
@pytest.mark.parametrize("series", ["S21570/S2010", "S21610/S2010"])
def test_the_real_philips_series_is_bit_identical(series, tmp_path, monkeypatch):
    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    found = scan_archive(PHILIPS / series)
    ref = max(found.selected, key=lambda r: len(r.files))
    assert all(read_native(ref.root / f) is not None for f in ref.files)  # every file takes the fast path
    for name in ref.files[:3]:
        _same_header(read_native(ref.root / name)[0], pydicom.dcmread(ref.root / name, stop_before_pixels=True))
    _same(*_both_ways(ref.root, ref.files, monkeypatch))


def test_what_it_does_not_read_falls_back(tmp_path):
    paths = write_series(tmp_path / "rle", SeriesSpec(n=2, seed=7))
    ds = pydicom.dcmread(paths[0])
    ds.compress(RLELossless)
    ds.save_as(paths[0], enforce_file_format=True)
    assert read_native(paths[0]) is None and read_native(paths[1]) is not None
    assert read_native(io.BytesIO(b"not dicom at all" * 20)) is None
    short = paths[1].read_bytes()[:-100]
    assert read_native(io.BytesIO(short)) is None  # a truncated file: the full reader names the problem
    # values this walker would read otherwise than pydicom: pydicom reads the file (and says what is wrong)
    odd = write_series(tmp_path / "odd", SeriesSpec(n=12, seed=8))
    _rewrite(odd[0], NumberOfFrames="1.0")
    assert read_native(odd[0]) is None
    assert load_dicom_series(odd[0].parent, [p.name for p in odd]).array.shape[0] == 12  # pydicom read it
    ds = pydicom.dcmread(odd[2])
    ds.ImagePositionPatient = [1.0]
    ds.save_as(odd[2], enforce_file_format=True)
    assert read_native(odd[2]) is None
    from hctembed.volume import VolumeError

    with pytest.raises(VolumeError):
        load_dicom_series(odd[0].parent, [p.name for p in odd])


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, -1024.0), (1.0, 0.0), (0.5, -1000.0), (2.0, -3000.0)])
@pytest.mark.parametrize("padding", [None, (-2000.0, -2000.0)])
@pytest.mark.parametrize("dtype", ["int16", "int32"])
def test_hu_conversion_equals_the_three_pass_formula(slope, intercept, padding, dtype):
    """``Rescale.apply``'s one-pass shortcuts (no multiply for a slope of 1, no clamp when nothing maps below air)
    give the float32 of rescale, padding and clamp done in full, bit for bit, and so do any blocks of it."""
    from hctembed.rescale import AIR_HU, Rescale

    rng = np.random.default_rng(0)
    for low in (-2000, 0, 1000):  # stored values that do, and do not, map below air
        raw = rng.integers(low, 4000, size=(8, 64, 64)).astype(dtype)
        if dtype == "int32":
            raw[0, 0, 0] = 16_777_217  # past float32's whole numbers: one rounding or two would differ
        rescale = Rescale(slope=slope, intercept=intercept, padding=padding)
        got = rescale.apply(raw, out=np.empty(raw.shape, np.float32))
        want = np.multiply(raw, np.float32(slope), dtype=np.float32) + np.float32(intercept)
        if padding is not None:
            want[(raw >= padding[0]) & (raw <= padding[1])] = AIR_HU
        want = np.maximum(want, np.float32(AIR_HU))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (slope, intercept, low)
        raw[2] = np.clip(raw[2], 1500, None)  # one slice that needs no clamp beside ones that may
        want = rescale.hu(raw)
        for key in (np.s_[2:3], np.s_[1:4], np.s_[3:5], np.s_[:, ::4, ::4], np.s_[::-1, 10:20]):  # slabs, samples
            part = rescale.hu(raw[key])
            assert np.array_equal(part.view(np.uint32), want[key].view(np.uint32)), key


ORIENTATIONS = {"axial": (1, 0, 0, 0, 1, 0), "sagittal": (0, 1, 0, 0, 0, -1), "coronal": (1, 0, 0, 0, 0, -1)}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("words", ["int16", "uint16 with padding"])
def test_a_regular_series_keeps_its_stored_values_and_gives_the_same_numbers(orientation, words, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    """A regular series with one rescale is held as its stored words (the slices read straight into one buffer);
    its HU array (values and layout), the checks' samples and the preprocessed input are the same, bit for bit, as
    from the volume converted slice by slice (``keep_stored=False``: what the loader built before), also after a
    pickle round trip; a series whose slices differ in rescale is converted slice by slice."""
    import pickle

    from hctembed.config import PreprocessConfig
    from hctembed.preprocessing import preprocess
    from hctembed.rescale import StoredValues

    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    paths = write_series(tmp_path / "s", SeriesSpec(n=12, seed=10, orientation=ORIENTATIONS[orientation]))
    if words != "int16":
        for p in paths:  # unsigned words, a padding value outside the body, and out-of-field values below air
            ds = pydicom.dcmread(p)
            values = np.frombuffer(ds.PixelData, np.int16).astype(np.int32) + 2048
            values[:40] = 0  # padding
            values[40:80] = 100  # -1948 HU: out of field, clamped to air
            ds.PixelRepresentation, ds.RescaleIntercept = 0, -2048
            ds.add_new((0x0028, 0x0120), "US", 0)  # PixelPaddingValue
            ds.PixelData = values.astype(np.uint16).tobytes()
            ds.save_as(p, enforce_file_format=True)
    names = [p.name for p in paths]
    volume = load_dicom_series(paths[0].parent, names)
    converted = load_dicom_series(paths[0].parent, names, keep_stored=False)
    assert converted.stored is None and isinstance(converted.voxels, np.ndarray)
    assert isinstance(volume.stored, StoredValues) and volume.voxels is volume.stored  # nothing converted yet
    assert volume.stored.buffer.dtype == (np.int16 if words == "int16" else np.uint16)
    assert volume.shape_xyz == converted.shape_xyz and np.array_equal(volume.affine, converted.affine)
    assert volume.meta == converted.meta
    assert _bits(volume.voxels[::2, ::4, ::4]) == _bits(converted.array[::2, ::4, ::4])
    assert volume.voxels[1, 2, 3] == converted.array[1, 2, 3] and np.ndim(volume.voxels[1, 2, 3]) == 0
    config = PreprocessConfig(pad_size=64, crop_size=48, out_size=24)
    assert _bits(preprocess(volume, config=config).numpy()) == _bits(preprocess(converted, config=config).numpy())
    assert volume.voxels is volume.stored  # the checks' sample and the resample converted parts, not the volume
    copied = pickle.loads(pickle.dumps(volume))  # a copy holds no view into its buffer: the layout rebuilds it
    assert _bits(copied.array) == _bits(converted.array)
    hu = volume.array  # converted now, once, and kept
    assert volume.voxels is hu and volume.array is hu
    assert hu.strides == converted.array.strides and _bits(hu) == _bits(converted.array)
    assert hu.min() >= -1024.0
    # one slice with another intercept: converted slice by slice, as before
    _rewrite(paths[5], RescaleIntercept=-1000)
    mixed = load_dicom_series(paths[0].parent, names)
    assert mixed.stored is None and mixed.array.dtype == np.float32


def test_the_checks_read_stored_values_without_converting_the_volume(tmp_path, monkeypatch):
    """An intercept of 0 on CT words (values that are not HU): the HU check finds it from its sample of the stored
    values, and refuses the scan before anything else is converted."""
    from hctembed.preprocessing.series import NotHuError, check_scan

    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    paths = write_series(tmp_path / "s", SeriesSpec(n=12, seed=11, rows=64, cols=64))
    good = load_dicom_series(paths[0].parent, [p.name for p in paths])
    check_scan(good.voxels, spacing_zyx=good.spacing_xyz[::-1], head_check=False)
    for p in paths:
        _rewrite(p, RescaleIntercept=0)
    bad = load_dicom_series(paths[0].parent, [p.name for p in paths])
    with pytest.raises(NotHuError, match="unrescaled"):
        check_scan(bad.voxels, spacing_zyx=bad.spacing_xyz[::-1], head_check=False)
    assert bad.voxels is bad.stored


def test_stored_values_refuse_a_layout_outside_their_buffer():
    from hctembed.rescale import Rescale, StoredValues

    buffer = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    view = buffer.transpose(2, 1, 0)[::-1]
    stored = StoredValues.of(buffer=buffer, values=view, rescale=Rescale(slope=1.0, intercept=0.0))
    assert np.array_equal(stored.values, view) and stored.layout[0] == 3
    assert np.array_equal(np.asarray(stored), view.astype(np.float32))
    with pytest.raises(ValueError, match="outside"):
        StoredValues(buffer=buffer, layout=(20, (2, 3, 4), (12, 4, 1)), rescale=Rescale(slope=1.0, intercept=0.0))
    with pytest.raises(ValueError, match="view"):
        StoredValues.of(buffer=buffer, values=view.copy(), rescale=Rescale(slope=1.0, intercept=0.0))


def _bits(a: np.ndarray) -> bytes:
    """``a``'s float32 values as bytes, in index order (equal bytes: equal bit for bit, NaN-safe)."""
    return np.ascontiguousarray(a, dtype=np.float32).tobytes()


def test_a_file_cut_short_after_its_header_was_read_is_one_clear_error(tmp_path):
    """The pixels are read when the volume is filled, after every header: a file that shrank in between (rewritten
    while the series loads) is a VolumeError naming that, not garbage or a traceback."""
    from hctembed.volume import VolumeError

    paths = write_series(tmp_path / "s", SeriesSpec(n=6, seed=9))
    _, where = read_native(paths[2])
    with pytest.raises(ValueError, match="C-contiguous"):
        where.read_into(np.empty((where.shape[1], where.shape[0]), where.dtype).T)
    paths[2].write_bytes(paths[2].read_bytes()[:-1000])
    with pytest.raises(VolumeError, match="shorter than when its header was read"):
        where.read()
