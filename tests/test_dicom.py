"""DICOM archives: assembly checks and the bad-input matrix, each on real files written with pydicom."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import SeriesSpec, expected_affine, head_slices, make_dataset, replace, write_series
from pydicom.uid import JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from hctembed.io.archive import load_series, load_volume, scan_archive
from hctembed.io.nifti import load_nifti
from hctembed.io.pseudonym import Pseudonymizer
from hctembed.io.slice_grid import regular
from hctembed.volume import VolumeError

KEYS = Pseudonymizer(b"test-secret-0123456789abcdef")


def scan(root: Path):
    return scan_archive(root, pseudonyms=KEYS)


def only_selected(root: Path):
    found = scan(root)
    assert len(found.selected) == 1, (found.selected, found.skipped)
    return found.selected[0], found


def skipped_codes(found) -> list[str]:
    return sorted(s.reason_code for s in found.skipped)


def test_axial_series_round_trip(tmp_path):
    spec = SeriesSpec()
    hu = head_slices(n=spec.n)
    write_series(tmp_path / "a", spec, hu=hu)
    ref, _ = only_selected(tmp_path)
    assert ref.scan_id.startswith("se-") and ref.patient_id.startswith("pt-")
    volume = load_series(ref)
    # RAS: x flipped from LPS columns, y flipped from rows; z ascending
    expected = np.clip(hu[:, ::-1, ::-1], -1024, None).astype(np.float32)
    np.testing.assert_array_equal(volume.array, expected)
    assert volume.spacing_xyz == pytest.approx((4.0, 4.0, 5.0))


@pytest.mark.skipif(
    shutil.which("dcm2niix") is None and not (Path(sys.executable).parent / "dcm2niix").exists(),
    reason="dcm2niix not installed (pip install dcm2niix)",
)
@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), "oblique"], ids=["axial", "oblique"])
def test_affine_agrees_with_dcm2niix(tmp_path, orientation):
    if orientation == "oblique":
        a, b = np.radians(12), np.radians(-7)
        row = np.array([np.cos(a), np.sin(a), 0.0])
        col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
        orientation = tuple(np.round(np.concatenate([row, col]), 6))
    spec = SeriesSpec(orientation=orientation, n=14)
    write_series(tmp_path / "dcm" / "s", spec)
    out = tmp_path / "nii"
    out.mkdir()
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    subprocess.run(
        [exe, "-z", "n", "-f", "x", "-o", str(out), str(tmp_path / "dcm" / "s")], check=True, capture_output=True
    )
    theirs = load_nifti(out / "x.nii")
    ours = load_volume(tmp_path / "dcm" / "s")
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    np.testing.assert_allclose(ours.array, theirs.array, atol=0.5)


def test_shuffled_names_and_instance_numbers_do_not_change_the_volume(tmp_path):
    spec = SeriesSpec()
    hu = head_slices(n=spec.n)
    write_series(tmp_path / "ordered", spec, hu=hu)
    shuffled = replace(spec, series_uid=generate_uid())
    rng = np.random.default_rng(0)
    folder = tmp_path / "shuffled"
    folder.mkdir()
    for k in range(spec.n):
        ds = make_dataset(shuffled, k=k, pixels_hu=hu[k], instance=int(rng.integers(1, 4)))  # duplicates too
        ds.save_as(folder / f"{rng.integers(1e9)}_{k}.dcm", enforce_file_format=True)
    found = scan(tmp_path)
    volumes = [load_series(r) for r in found.selected]
    assert len(volumes) == 2
    np.testing.assert_array_equal(volumes[0].array, volumes[1].array)


def test_text_and_empty_files_are_listed_and_the_series_still_loads(tmp_path):
    write_series(tmp_path / "s", SeriesSpec())
    (tmp_path / "s" / "README").write_text("scanner notes")
    (tmp_path / "s" / "IM9999").write_bytes(b"")
    (tmp_path / "s" / "notes.txt").write_text("ignored by extension")
    ref, found = only_selected(tmp_path)
    assert skipped_codes(found) == ["empty_file", "not_dicom"]
    load_series(ref)


def test_slice_cut_inside_its_header(tmp_path):
    paths = write_series(tmp_path / "s", SeriesSpec(n=12))
    paths[-1].write_bytes(paths[-1].read_bytes()[:200])  # the last slice: cut inside the header
    ref, found = only_selected(tmp_path)
    assert "not_dicom" in skipped_codes(found)
    assert load_series(ref).array.shape[0] == 11


def test_truncated_pixel_data_is_a_clear_error(tmp_path):
    paths = write_series(tmp_path / "s", SeriesSpec(n=12))
    paths[5].write_bytes(paths[5].read_bytes()[:-1000])
    ref, _ = only_selected(tmp_path)
    with pytest.raises(VolumeError, match="pixel data"):
        load_series(ref)


def _jpeg2000_series(tmp_path) -> tuple[Path, np.ndarray]:
    spec = SeriesSpec(n=12)
    hu = head_slices(n=spec.n)
    folder = tmp_path / "j2k"
    folder.mkdir()
    for k in range(spec.n):
        ds = make_dataset(spec, k=k, pixels_hu=hu[k])
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return folder, hu


def test_jpeg2000_decodes_through_the_installed_plugin(tmp_path):
    folder, hu = _jpeg2000_series(tmp_path)
    volume = load_volume(folder)
    np.testing.assert_array_equal(volume.array, np.clip(hu[:, ::-1, ::-1], -1024, None))


def test_jpeg2000_without_a_decoder_names_the_syntax(tmp_path):
    folder, _ = _jpeg2000_series(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("openjpeg", "gdcm", "pylibjpeg", "libjpeg", "PIL"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from hctembed.io.archive import load_volume
        from hctembed.volume import VolumeError
        try:
            load_volume({str(folder)!r})
        except VolumeError as exc:
            print(exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "JPEG 2000" in result.stdout and "no pixel-data plugin" in result.stdout, result.stdout + result.stderr


def test_localizers_are_dropped_and_a_localizer_only_series_is_skipped(tmp_path):
    spec = SeriesSpec(n=12)
    write_series(tmp_path / "s", spec)
    scout = replace(spec, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), n=2, orientation=(0, 1, 0, 0, 0, -1))
    write_series(tmp_path / "s", scout, names=["SCOUT1.dcm", "SCOUT2.dcm"])
    ref, _ = only_selected(tmp_path)
    assert "localizers_dropped:2" in ref.flags
    only_scouts = replace(scout, series_uid=generate_uid())
    write_series(tmp_path / "t", only_scouts)
    assert "localizer_only" in skipped_codes(scan(tmp_path))


def test_dose_report_and_secondary_capture_are_skipped(tmp_path):
    write_series(tmp_path / "sc", SeriesSpec(n=3, sop_class=SecondaryCaptureImageStorage, modality="OT"))
    write_series(tmp_path / "sr", SeriesSpec(n=1, sop_class="1.2.840.10008.5.1.4.1.1.88.67", modality="SR"))
    found = scan(tmp_path)
    assert not found.selected
    assert skipped_codes(found) == ["secondary_capture", "structured_report"]


def test_mr_is_skipped(tmp_path):
    write_series(tmp_path / "mr", SeriesSpec(modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4"))
    found = scan(tmp_path)
    assert skipped_codes(found) == ["not_ct"]
    assert "MR" in found.skipped[0].reason


def test_two_series_in_one_folder(tmp_path):
    write_series(tmp_path / "s", SeriesSpec(n=12), names=[f"A{k}.dcm" for k in range(12)])
    write_series(tmp_path / "s", SeriesSpec(n=14, thickness=2.5, step=2.5), names=[f"B{k}.dcm" for k in range(14)])
    found = scan(tmp_path)
    assert sorted(len(r.files) for r in found.selected) == [12, 14]
    assert len({r.scan_id for r in found.selected}) == 2


def test_one_uid_with_two_stacks_becomes_two_candidates(tmp_path):
    uid = generate_uid()
    axial = SeriesSpec(n=12, series_uid=uid)
    coronal = replace(axial, orientation=(1, 0, 0, 0, 0, -1), origin=(-94, 30, 94))
    write_series(tmp_path / "s", axial, names=[f"A{k}.dcm" for k in range(12)])
    write_series(tmp_path / "s", coronal, names=[f"C{k}.dcm" for k in range(12)])
    found = scan(tmp_path)
    assert len(found.selected) == 2
    assert sorted(f for r in found.selected for f in r.flags if f.startswith("stack:")) == ["stack:1of2", "stack:2of2"]
    for ref in found.selected:
        load_series(ref)


def test_repeated_acquisition_over_the_same_positions_is_split(tmp_path):
    uid = generate_uid()
    first = SeriesSpec(n=12, series_uid=uid)
    write_series(tmp_path / "s", first, names=[f"A{k}.dcm" for k in range(12)])
    folder = tmp_path / "s"
    hu = head_slices(n=12, seed=3)
    for k in range(12):
        ds = make_dataset(first, k=k, pixels_hu=hu[k])
        ds.AcquisitionNumber = 2
        ds.save_as(folder / f"B{k}.dcm", enforce_file_format=True)
    assert len(scan(tmp_path).selected) == 2


def test_duplicate_files_are_deduplicated(tmp_path):
    paths = write_series(tmp_path / "s", SeriesSpec(n=12))
    shutil.copy(paths[3], tmp_path / "s" / "copy_of_IM0004.dcm")
    ref, _ = only_selected(tmp_path)
    assert "duplicate_files:1" in ref.flags
    assert load_series(ref).array.shape[0] == 12


def test_two_different_slices_at_one_position(tmp_path):
    spec = SeriesSpec(n=12)
    write_series(tmp_path / "s", spec)
    ds = make_dataset(spec, k=4, pixels_hu=head_slices(n=12, seed=9)[4])
    ds.save_as(tmp_path / "s" / "other_at_4.dcm", enforce_file_format=True)
    ref, _ = only_selected(tmp_path)
    with pytest.raises(VolumeError, match="two different slices at one position"):
        load_series(ref)


def test_missing_middle_slice_names_the_gap(tmp_path):
    paths = write_series(tmp_path / "s", SeriesSpec(n=14))
    paths[7].unlink()
    ref, _ = only_selected(tmp_path)
    with pytest.raises(VolumeError, match=r"missing slices: largest gap 10.00 mm where slices are 5.00 mm apart"):
        load_series(ref)


def test_mixed_spacing_is_resampled_and_flagged(tmp_path):
    spec = SeriesSpec(n=16)
    positions = np.concatenate([np.arange(8) * 2.5, 17.5 + np.arange(1, 9) * 5.0]) - 40
    hu = head_slices(n=16)
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(16):
        ds = make_dataset(spec, k=k, pixels_hu=hu[k])
        ds.ImagePositionPatient = [-94.0, -94.0, float(positions[k])]
        ds.save_as(folder / f"IM{k}.dcm", enforce_file_format=True)
    ref, _ = only_selected(tmp_path)
    volume = load_series(ref)
    assert any(f.startswith("nonuniform_spacing_resampled") for f in volume.meta["flags"])
    # the slices as stored with their true positions (interpolated once, by the preprocessing) ...
    assert volume.array.shape[0] == 16
    np.testing.assert_allclose(volume.stack.positions * volume.spacing_xyz[2], positions - positions[0], atol=1e-6)
    # ... and on the regular lattice of the finest spacing for everything else
    lattice = regular(volume)
    assert lattice.spacing_xyz[2] == pytest.approx(2.5)
    assert lattice.array.shape[0] == round((positions[-1] - positions[0]) / 2.5) + 1


def test_gantry_tilt_is_corrected_and_flagged(tmp_path):
    """A vertical rod imaged with 15° tilt comes out straight (same column in every slice)."""
    spec = SeriesSpec(n=14, tilt_deg=15.0, rows=48, cols=48)
    hu = np.full((14, 48, 48), -1000, np.int16)
    pos = spec.positions()
    col_dir = np.array(spec.orientation[3:])
    for k in range(14):
        # the rod sits at world y = 0; in slice k it appears at row (0 - origin_k·col) / spacing
        row = round((0.0 - pos[k] @ col_dir) / spec.spacing)
        hu[k, row - 1 : row + 2, 22:26] = 500
    write_series(tmp_path / "s", spec, hu=hu)
    ref, _ = only_selected(tmp_path)
    volume = load_series(ref)
    assert any(f.startswith("gantry_tilt_corrected:15.0") for f in volume.meta["flags"])
    rows = [np.argmax(volume.array[k].max(axis=1)) for k in range(14)]
    assert max(rows) - min(rows) <= 1
    column = volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2])
    assert abs(column[2]) == pytest.approx(1.0, abs=1e-6)  # orthogonal grid: slices stack along +S


def test_a_stray_slice_with_other_rows_is_dropped(tmp_path):
    spec = SeriesSpec(n=12)
    write_series(tmp_path / "s", spec)
    odd = replace(spec, rows=40)
    ds = make_dataset(odd, k=3, pixels_hu=head_slices(n=12, rows=40)[3])
    ds.save_as(tmp_path / "s" / "odd.dcm", enforce_file_format=True)
    ref, _ = only_selected(tmp_path)
    assert "inconsistent_geometry_dropped:1" in ref.flags
    assert load_series(ref).array.shape == (12, 48, 48)


def test_five_slices_are_too_few(tmp_path):
    write_series(tmp_path / "s", SeriesSpec(n=5))
    found = scan(tmp_path)
    assert skipped_codes(found) == ["too_few_slices"]


def test_missing_rescale_tags(tmp_path):
    spec = SeriesSpec(n=12, slope=None)
    write_series(tmp_path / "signed", spec)  # stored values already HU (air at -1000)
    ref, _ = only_selected(tmp_path)
    volume = load_series(ref)
    assert "rescale_missing" in volume.meta["flags"] and -1024 <= volume.array.min() < -900
    unsigned = replace(spec, series_uid=generate_uid())
    write_series(tmp_path / "unsigned", unsigned, hu=head_slices(n=12) + 1024)  # air stored as ~0
    refs = [r for r in scan(tmp_path).selected if r.location == "unsigned"]
    with pytest.raises(VolumeError, match="not HU"):
        load_series(refs[0])


def test_per_slice_intercepts(tmp_path):
    spec = SeriesSpec(n=12)
    hu = head_slices(n=12)
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(12):
        s = replace(spec, intercept=-1024.0 - 10 * k, slope=0.5 + 0.25 * (k % 3))
        make_dataset(s, k=k, pixels_hu=hu[k]).save_as(folder / f"IM{k}.dcm", enforce_file_format=True)
    volume = load_volume(folder)
    np.testing.assert_allclose(volume.array, np.clip(hu[:, ::-1, ::-1], -1024, None), atol=0.5)


def test_padding_outside_the_field_of_view_becomes_air(tmp_path):
    spec = SeriesSpec(n=12)
    hu = head_slices(n=12).astype(np.int32)
    yy, xx = np.mgrid[:48, :48]
    outside = (yy - 23.5) ** 2 + (xx - 23.5) ** 2 > 24**2
    hu[:, outside] = 30000 - 1024  # a padding value far above any tissue: only the padding rule makes it air
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(12):
        ds = make_dataset(spec, k=k, pixels_hu=hu[k].astype(np.int16))
        ds.PixelPaddingValue = 30000  # the stored value of the padding
        ds.save_as(folder / f"IM{k}.dcm", enforce_file_format=True)
    volume = load_volume(folder)
    assert (volume.array[:, outside[::-1, ::-1]] == -1024).all()
    assert volume.array.max() < 3000


def test_monochrome1_keeps_hu(tmp_path):
    spec = SeriesSpec(n=12)
    hu = head_slices(n=12)
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(12):
        ds = make_dataset(spec, k=k, pixels_hu=hu[k])
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.save_as(folder / f"IM{k}.dcm", enforce_file_format=True)
    np.testing.assert_array_equal(load_volume(folder).array, np.clip(hu[:, ::-1, ::-1], -1024, None))


def test_enhanced_multiframe_ct_equals_the_classic_series(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    spec = SeriesSpec(n=12)
    hu = head_slices(n=12)
    write_series(tmp_path / "classic", spec, hu=hu)
    ds = make_dataset(
        replace(spec, series_uid=generate_uid(), sop_class="1.2.840.10008.5.1.4.1.1.2.1"), k=0, pixels_hu=hu[0]
    )
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, tag)
    ds.NumberOfFrames = 12
    ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.int16).tobytes()
    shared = Dataset()
    orient, measures, transform = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = list(spec.orientation)
    measures.PixelSpacing = [spec.spacing, spec.spacing]
    measures.SliceThickness = spec.thickness
    transform.RescaleSlope, transform.RescaleIntercept = 1.0, -1024.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in np.arange(12)[::-1]:  # frames stored in reverse order: positions decide
        group, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [float(v) for v in spec.positions()[k]]
        group.PlanePositionSequence = Sequence([plane])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = (hu[::-1].astype(np.int32) + 1024).astype(np.int16).tobytes()
    (tmp_path / "enhanced").mkdir()
    ds.save_as(tmp_path / "enhanced" / "multi.dcm", enforce_file_format=True)
    found = scan(tmp_path)
    assert len(found.selected) == 2
    classic, enhanced = (load_series(r) for r in sorted(found.selected, key=lambda r: r.location))
    np.testing.assert_array_equal(classic.array, enhanced.array)
    np.testing.assert_allclose(classic.affine, enhanced.affine)


def test_zip_of_a_series(tmp_path):
    import zipfile

    paths = write_series(tmp_path / "src", SeriesSpec(n=12))
    (tmp_path / "arch").mkdir()
    with zipfile.ZipFile(tmp_path / "arch" / "study.zip", "w") as zf:
        for p in paths:
            zf.write(p, arcname=f"series/{p.name}")
    ref, _ = only_selected(tmp_path / "arch")
    assert ref.files[0].startswith("study.zip!series/")
    np.testing.assert_array_equal(load_series(ref).array, load_volume(tmp_path / "src").array)


def test_expected_affine_helper_matches_assembly(tmp_path):
    spec = SeriesSpec(n=12)
    write_series(tmp_path / "s", spec)
    from hctembed.io.dicom import load_dicom_series

    ref, _ = only_selected(tmp_path)
    volume = load_dicom_series(ref.root, ref.files)
    from hctembed.volume import orient_to_ras

    _, affine, _ = orient_to_ras(np.zeros((48, 48, 12)), expected_affine(spec))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)


def test_a_stray_slice_with_other_orientation_is_dropped(tmp_path):
    spec = SeriesSpec(n=12)
    write_series(tmp_path / "s", spec)
    odd = replace(spec, orientation=(1, 0, 0, 0, 0.9961947, -0.0871557))  # 5 degrees off
    make_dataset(odd, k=6, pixels_hu=head_slices(n=12)[6]).save_as(tmp_path / "s" / "odd.dcm", enforce_file_format=True)
    ref, _ = only_selected(tmp_path)
    assert "inconsistent_geometry_dropped:1" in ref.flags
    assert load_series(ref).array.shape == (12, 48, 48)


def test_two_zones_of_spacing_are_resampled_not_called_missing(tmp_path):
    spec = SeriesSpec(n=36)
    positions = np.concatenate([np.arange(30) * 2.5, 72.5 + np.arange(1, 7) * 5.0]) - 40
    hu = head_slices(n=36, thickness=2.5)
    folder = tmp_path / "s"
    folder.mkdir()
    for k in range(36):
        ds = make_dataset(spec, k=k, pixels_hu=hu[k])
        ds.ImagePositionPatient = [-94.0, -94.0, float(positions[k])]
        ds.save_as(folder / f"IM{k}.dcm", enforce_file_format=True)
    volume = load_volume(folder)
    assert any(f.startswith("nonuniform_spacing_resampled") for f in volume.meta["flags"])


def test_scans_without_patient_id_do_not_share_a_patient(tmp_path):
    for i in range(2):
        write_series(tmp_path / f"s{i}", SeriesSpec(n=12, patient={"PatientName": "", "PatientID": ""}))
    found = scan(tmp_path)
    assert len({r.patient_id for r in found.selected}) == 2
