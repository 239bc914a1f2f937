"""Sequential head CT: slice zones of different spacing (with an overlapping or interleaved boundary slice) and
gantry tilt, each checked against the truth in the files: a volume, sampled at every slice's true pixel positions
(ImagePositionPatient + ImageOrientationPatient + PixelSpacing), gives the slice's HU back.

Two volumes are checked: the 1 mm grid the paper preprocessing resamples a slice stack onto in one interpolation
from the true positions (what embedding sees), and the regular lattice (:func:`hctembed.io.slice_grid.regular`,
the finest zone's spacing) that every other consumer reads, made by blending moved slices (two interpolations)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import SeriesSpec, head_at, make_dataset, replace, write_series, zone_offsets
from scipy.ndimage import map_coordinates

from hctembed.io.dicom import load_dicom_series
from hctembed.io.selection import SelectionConfig
from hctembed.io.slice_grid import EDGE_SLACK_PX, regular
from hctembed.preprocessing.resample import isotropic_volume
from hctembed.volume import Volume, VolumeError

log = logging.getLogger(__name__)

HEAD_HU = -100.0  # a pixel above this is head (skin, brain, bone)
PHILIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dcm_qa_ct_philips"
PHILIPS_TILTED = PHILIPS / "S21610" / "S2010"
DCM2NIIX = shutil.which("dcm2niix") or shutil.which("dcm2niix", path=str(Path(sys.executable).parent))


# ---- the truth in the files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileSlice:
    hu: np.ndarray  # [rows, cols] float32, air floor -1024 like the assembly
    points: np.ndarray  # [rows, cols, 3] true LPS position of each pixel, mm
    normal: np.ndarray  # [3]
    distance: float  # position along the normal, mm
    pixel_mm2: float


def read_slices(paths: list[Path]) -> list[FileSlice]:
    """Every file's HU and true pixel positions, ordered along the slice normal."""
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_mm, col_mm = (float(v) for v in ds.PixelSpacing)  # between rows, between columns
        rows, cols = int(ds.Rows), int(ds.Columns)
        i = np.arange(rows)[:, None, None] * row_mm * iop[3:]  # down a column: rows
        j = np.arange(cols)[None, :, None] * col_mm * iop[:3]  # along a row: columns
        hu = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        normal = np.cross(iop[:3], iop[3:])
        out.append(
            FileSlice(
                hu=np.maximum(hu, -1024).astype(np.float32),
                points=ipp + i + j,
                normal=normal,
                distance=float(ipp @ normal),
                pixel_mm2=row_mm * col_mm,
            )
        )
    return sorted(out, key=lambda s: s.distance)


def voxel_coordinates(volume: Volume, points_lps: np.ndarray) -> np.ndarray:
    """Volume array indices ``[3, N]`` as (z, y, x) of LPS ``points [N, 3]`` (the affine maps to RAS)."""
    ras = points_lps * np.array([-1.0, -1.0, 1.0])
    xyz = np.linalg.solve(volume.affine, np.c_[ras, np.ones(len(ras))].T)[:3]
    return xyz[::-1]


def sample(volume: Volume, points_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear HU at ``points [N, 3]`` and whether each lies inside the voxel grid ``[N]``."""
    zyx = voxel_coordinates(volume, points_lps)
    top = np.array(volume.array.shape)[:, None] - 1
    inside = np.all((zyx >= -1e-3) & (zyx <= top + 1e-3), axis=0)
    values = map_coordinates(volume.array, np.clip(zyx, 0, top), order=1, mode="nearest")
    return values, inside


@dataclass(frozen=True)
class Agreement:
    mean_abs_hu: float  # mean |volume - file| over the compared pixels (away from the end slices and image edge)
    pixels: int  # pixels compared
    outside: int  # selected pixels (any slice) whose true position lies outside the grid's field of view
    ml_files: float  # volume of the selected pixels in the slices (pixel area times the slice's share of the normal)
    ml_volume: float  # volume of the voxels above the same threshold in the assembled volume


def agreement(
    volume: Volume, paths: list[Path], *, above: float = HEAD_HU, margin: int = 2, stride: int = 1
) -> Agreement:
    """Compare ``volume`` with the files' own pixels above ``above`` HU at their true positions (every
    ``stride``-th pixel). ``outside`` counts in-plane losses only: along the normal the uniform grid ends at its
    last step inside the stack (it never extrapolates), so part of a step beyond it may not be covered."""
    slices = read_slices(paths)
    distance = np.array([s.distance for s in slices])
    bounds = np.r_[distance[0], (distance[1:] + distance[:-1]) / 2, distance[-1]]
    diffs, outside, ml = [], 0, 0.0
    for k, s in enumerate(slices):
        selected = s.hu > above
        ml += selected.sum() * s.pixel_mm2 * (bounds[k + 1] - bounds[k]) / 1000
        outside += int((~in_field_of_view(volume, s.points[selected])).sum())
        if k in (0, len(slices) - 1):
            continue
        keep = np.zeros_like(selected)
        keep[margin:-margin:stride, margin:-margin:stride] = True
        keep &= selected
        values, inside = sample(volume, s.points[keep])
        diffs.append(np.where(inside, np.abs(values - s.hu[keep]), np.inf))
    diff = np.concatenate(diffs)
    voxel_ml = float(np.prod(volume.spacing_xyz)) / 1000
    return Agreement(
        mean_abs_hu=float(diff.mean()),
        pixels=len(diff),
        outside=outside,
        ml_files=ml,
        ml_volume=float((volume.array > above).sum() * voxel_ml),
    )


def in_field_of_view(volume: Volume, points_lps: np.ndarray) -> np.ndarray:
    """Whether each of ``points [N, 3]`` lies within the grid's in-plane extent (the volume's y and x axes), up to
    the slack the assembly allows so that jitter in the positions does not grow the grid."""
    zyx = voxel_coordinates(volume, points_lps)[1:]
    top = np.array(volume.array.shape[1:])[:, None] - 1
    return np.all((zyx >= -EDGE_SLACK_PX) & (zyx <= top + EDGE_SLACK_PX), axis=0)


def outside_first_field_of_view(paths: list[Path]) -> float:
    """Fraction of head pixels that lie outside the first slice's field of view extended along the normal
    (the grid tilt correction used to keep): above zero, that grid would have cut the head."""
    slices = read_slices(paths)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    origin = slices[0].points[0, 0]
    total = lost = 0
    for s in slices:
        rel = s.points[s.hu > HEAD_HU] - origin
        i, j = rel @ iop[3:] / row_mm, rel @ iop[:3] / col_mm
        out = (i < 0) | (i > int(first.Rows) - 1) | (j < 0) | (j > int(first.Columns) - 1)
        total, lost = total + len(i), lost + int(out.sum())
    return lost / total


def assemble_files(folder: Path, *, config: SelectionConfig | None = None) -> tuple[Volume, list[Path]]:
    paths = sorted(p for p in folder.iterdir() if p.is_file())
    return load_dicom_series(folder, [p.name for p in paths], config=config), paths


def write_head(folder: Path, spec: SeriesSpec) -> list[Path]:
    """A series imaging one head fixed in patient space (so zones and tilt see the same object)."""
    hu = head_at(spec.pixel_positions(), noise_sd=3.0, seed=spec.seed)
    return write_series(folder, spec, hu=hu)


def write_ramp(folder: Path, spec: SeriesSpec) -> list[Path]:
    """A linear HU ramp in patient space: linear interpolation is exact on it, so any misplaced voxel shows."""
    x, y, z = np.moveaxis(spec.pixel_positions(), -1, 0)
    return write_series(folder, spec, hu=np.round(0.5 * x + 0.8 * y + 1.5 * z + 100).astype(np.int16))


def report(case: str, result: Agreement) -> None:
    log.info("%s: mean |dHU| %.2f over %d pixels; %.1f ml in files, %.1f ml in volume; %d outside", case,
             result.mean_abs_hu, result.pixels, result.ml_files, result.ml_volume, result.outside)  # fmt: skip


def assert_agrees(case: str, result: Agreement, *, max_mean_abs_hu: float) -> None:
    report(case, result)
    assert result.outside == 0, f"{case}: {result.outside} pixels outside the field of view"
    assert result.mean_abs_hu < max_mean_abs_hu, f"{case}: mean |dHU| {result.mean_abs_hu:.1f}"
    assert result.ml_volume == pytest.approx(result.ml_files, rel=0.04), case


# ---- synthetic sequential CT --------------------------------------------------------------------------------

FOUR_SEVEN = ((4.0, 12), (7.0, 17))  # posterior fossa in 4 mm, the cerebrum in 7 mm: 158 mm in all
PIXEL_MM = 2.0
# mean |dHU| allowed in the head on the regular lattice: the phantom's skull is a sharp-edged 7 mm shell of 1200
# HU, so each linear interpolation (along the normal between zones, in-plane for tilt, then trilinear sampling
# back) blurs its edges; the linear ramp and the real Philips series show the geometry itself is exact
MAX_HEAD_ERROR = {"zones": 40.0, "tilt": 35.0, "zones+tilt": 65.0}
# on the 1 mm grid interpolated once from the true positions (issue 28: dcm2niix reaches 22.5 on a real GE series)
MAX_ONE_PASS_ERROR = 22.0


def centred_spec(*, offsets: np.ndarray, tilt_deg: float = 0.0, rows: int = 112, cols: int = 96) -> SeriesSpec:
    """Slices at ``offsets`` along the normal whose middle one is centred on the head at the origin, as a tilted
    gantry's field of view follows the head: the first slice's field of view is then off the head's centre."""
    mid = (offsets[0] + offsets[-1]) / 2
    shift = mid * np.tan(np.radians(tilt_deg))
    origin = (-(cols - 1) * PIXEL_MM / 2, -(rows - 1) * PIXEL_MM / 2 - shift, -mid)
    return SeriesSpec(
        n=len(offsets), rows=rows, cols=cols, spacing=PIXEL_MM, slice_offsets=offsets, tilt_deg=tilt_deg, origin=origin
    )


def zones_spec(*, boundary: float | None, tilt_deg: float = 0.0, zones=FOUR_SEVEN, rows: int = 112) -> SeriesSpec:
    return centred_spec(offsets=zone_offsets(zones=zones, boundary=boundary), tilt_deg=tilt_deg, rows=rows)


@pytest.mark.parametrize(
    ("boundary", "tilt_deg"),
    [(2.0, 0.0), (-2.0, 0.0), (None, 0.0), (2.0, 15.0), (2.0, -15.0), (-2.0, -15.0)],
    ids=["overlap", "interleaved", "abutting", "overlap-tilt+15", "overlap-tilt-15", "interleaved-tilt-15"],
)
def test_two_zones_agree_with_the_true_positions(tmp_path, boundary, tilt_deg):
    spec = zones_spec(boundary=boundary, tilt_deg=tilt_deg)
    write_head(tmp_path / "s", spec)
    volume, paths = assemble_files(tmp_path / "s")
    flags = volume.meta["flags"]
    assert "nonuniform_spacing_resampled:4.00+7.00mm" in flags
    assert any(f.startswith(f"gantry_tilt_corrected:{abs(tilt_deg):.1f}") for f in flags) == bool(tilt_deg)
    case = f"head, zones 4/7 mm, boundary step {boundary}, tilt {tilt_deg:+g}"
    assert volume.stack is not None and volume.array.shape[0] == spec.n  # the slices as stored, none blended
    assert_agrees(f"{case}, 1 mm in one pass", agreement(isotropic_volume(volume, spacing_mm=1.0), paths),
                  max_mean_abs_hu=MAX_ONE_PASS_ERROR)  # fmt: skip
    lattice = regular(volume)
    assert lattice.spacing_xyz[2] == pytest.approx(4.0)
    limit = MAX_HEAD_ERROR["zones+tilt" if tilt_deg else "zones"]
    assert_agrees(f"{case}, regular lattice", agreement(lattice, paths), max_mean_abs_hu=limit)


def test_one_pass_beats_the_two_step_chain_on_a_two_zone_tilted_head(tmp_path):
    """The same 1 mm grid made the old way (slices blended onto the 4 mm lattice, then the spline to 1 mm) is
    further from the files' own values than the grid interpolated once from their true positions."""
    spec = zones_spec(boundary=2.0, tilt_deg=-28.0, rows=104)
    write_head(tmp_path / "s", spec)
    volume, paths = assemble_files(tmp_path / "s")
    one = agreement(isotropic_volume(volume, spacing_mm=1.0), paths)
    two = agreement(isotropic_volume(regular(volume), spacing_mm=1.0), paths)
    report("zones 4/7 mm, tilt -28, 1 mm in one pass", one)
    report("zones 4/7 mm, tilt -28, 1 mm after the regular lattice", two)
    assert one.outside == 0 and two.outside == 0
    assert one.mean_abs_hu < MAX_ONE_PASS_ERROR < two.mean_abs_hu


@pytest.mark.parametrize(("boundary", "tilt_deg"), [(2.0, 0.0), (-2.0, 15.0), (2.0, -28.0)])
def test_a_linear_ramp_comes_back_exactly(tmp_path, boundary, tilt_deg):
    """Linear interpolation reproduces a linear field, so only misplaced voxels could raise the error above the
    rounding of the stored integers."""
    spec = zones_spec(boundary=boundary, tilt_deg=tilt_deg)
    write_ramp(tmp_path / "s", spec)
    volume, paths = assemble_files(tmp_path / "s")
    for name, made in (("regular lattice", regular(volume)), ("1 mm", isotropic_volume(volume, spacing_mm=1.0))):
        result = agreement(made, paths, above=-1000, margin=4)
        report(f"ramp, zones 4/7 mm, boundary step {boundary}, tilt {tilt_deg:+g}, {name}", result)
        # the whole image is selected here: MONAI's 1 mm grid rule may end up to half a voxel inside the grown
        # field of view's corners (the head cases check that no head pixel is lost)
        assert result.outside == 0 or name == "1 mm"
        assert result.mean_abs_hu < 0.5, name


def test_upper_zone_finer_is_anchored_on_its_slices(tmp_path):
    """7 mm below, 4 mm above: the grid passes through the 4 mm slices, which come back unchanged."""
    spec = zones_spec(boundary=3.0, zones=((7.0, 8), (4.0, 14)))
    paths = write_head(tmp_path / "s", spec)
    volume, _ = assemble_files(tmp_path / "s")
    assert "nonuniform_spacing_resampled:4.00+7.00mm" in volume.meta["flags"]
    volume = regular(volume)
    top = read_slices(paths)[-1]
    values, inside = sample(volume, top.points.reshape(-1, 3))
    assert inside.all()
    np.testing.assert_allclose(values, top.hu.ravel(), atol=1e-3)


def test_five_and_ten_mm_zones_pass(tmp_path):
    spec = zones_spec(boundary=None, zones=((5.0, 10), (10.0, 11)))
    write_head(tmp_path / "s", spec)
    volume, paths = assemble_files(tmp_path / "s")
    assert "nonuniform_spacing_resampled:5.00+10.00mm" in volume.meta["flags"]
    assert_agrees("head, zones 5/10 mm", agreement(regular(volume), paths), max_mean_abs_hu=MAX_HEAD_ERROR["zones"])


def test_zones_too_far_apart_are_refused(tmp_path):
    spec = zones_spec(boundary=None, zones=((1.0, 10), (8.0, 10)), rows=48)
    write_head(tmp_path / "s", replace(spec, cols=48))
    with pytest.raises(VolumeError, match=r"non-uniform slice spacing: zones of 1.00\+8.00 mm \(ratio 8.0 > 3\)"):
        assemble_files(tmp_path / "s")
    volume, _ = assemble_files(tmp_path / "s", config=SelectionConfig(max_spacing_ratio=10))
    assert regular(volume).spacing_xyz[2] == pytest.approx(1.0)


def test_the_resampled_grid_is_checked_against_max_voxels(tmp_path):
    spec = zones_spec(boundary=2.0)
    write_head(tmp_path / "s", spec)
    paths = sorted((tmp_path / "s").iterdir())
    claimed = spec.n * spec.rows * spec.cols  # the slices pass; the 4 mm grid over 158 mm holds 40 slices
    with pytest.raises(VolumeError, match="the resampled grid claims"):
        load_dicom_series(tmp_path / "s", [p.name for p in paths], max_voxels=claimed + 1000)


def test_a_missing_slice_inside_a_zone_is_still_an_error(tmp_path):
    paths = write_head(tmp_path / "s", zones_spec(boundary=2.0, rows=48))
    paths[20].unlink()  # in the 7 mm zone
    with pytest.raises(VolumeError, match=r"missing slices: largest gap 14.00 mm where slices are 7.00 mm apart"):
        assemble_files(tmp_path / "s")


def test_a_gap_at_the_zone_boundary_is_a_missing_slice(tmp_path):
    write_head(tmp_path / "s", zones_spec(boundary=12.0, rows=48))  # 1.7 x the coarser zone's 7 mm: unimaged
    with pytest.raises(VolumeError, match=r"missing slices: largest gap 12.00 mm where slices are 7.00 mm apart"):
        assemble_files(tmp_path / "s")


@pytest.mark.parametrize("tilt_deg", [30.0, -30.0, 25.0])
def test_tilt_grows_the_field_of_view_so_no_head_voxel_is_lost(tmp_path, tilt_deg):
    spec = centred_spec(offsets=np.arange(33) * 5.0, tilt_deg=tilt_deg, rows=104)
    write_head(tmp_path / "s", spec)
    volume, paths = assemble_files(tmp_path / "s")
    assert outside_first_field_of_view(paths) > 0.02  # the first slice's field of view would have cut the head
    assert volume.array.shape[1] > spec.rows
    assert any(f.startswith(f"gantry_tilt_corrected:{abs(tilt_deg):.1f}") for f in volume.meta["flags"])
    case = f"head, 5 mm, tilt {tilt_deg:+g}"
    assert_agrees(case, agreement(regular(volume), paths), max_mean_abs_hu=MAX_HEAD_ERROR["tilt"])
    assert_agrees(f"{case}, 1 mm in one pass", agreement(isotropic_volume(volume, spacing_mm=1.0), paths),
                  max_mean_abs_hu=MAX_ONE_PASS_ERROR)  # fmt: skip


def test_jitter_in_the_positions_does_not_grow_the_field_of_view(tmp_path):
    spec = SeriesSpec(n=12)
    hu = head_at(spec.pixel_positions())
    rng = np.random.default_rng(1)
    (tmp_path / "s").mkdir()
    for k in range(spec.n):
        ds = make_dataset(spec, k=k, pixels_hu=hu[k])
        ds.ImagePositionPatient = [float(v) for v in spec.positions()[k] + [*rng.uniform(-0.02, 0.02, 2), 0.0]]
        ds.save_as(tmp_path / "s" / f"IM{k:04d}.dcm", enforce_file_format=True)
    volume, _ = assemble_files(tmp_path / "s")
    assert volume.array.shape == (12, 48, 48)


def test_zones_with_a_large_tilt_keep_the_head(tmp_path):
    spec = zones_spec(boundary=2.0, tilt_deg=-28.0, rows=104)
    write_head(tmp_path / "s", spec)
    volume, paths = assemble_files(tmp_path / "s")
    assert outside_first_field_of_view(paths) > 0.02
    assert_agrees(
        "head, zones 4/7 mm, tilt -28", agreement(regular(volume), paths), max_mean_abs_hu=MAX_HEAD_ERROR["zones+tilt"]
    )
    one = agreement(isotropic_volume(volume, spacing_mm=1.0), paths)
    assert_agrees("head, zones 4/7 mm, tilt -28, 1 mm in one pass", one, max_mean_abs_hu=MAX_ONE_PASS_ERROR)


# ---- real scanner data --------------------------------------------------------------------------------------


@pytest.mark.skipif(not PHILIPS_TILTED.is_dir(), reason=f"real Philips CT not present at {PHILIPS_TILTED}")
def test_real_tilted_philips_series_agrees_with_its_true_positions():
    names = sorted(p.name for p in PHILIPS_TILTED.iterdir() if p.name.startswith("I"))
    volume = load_dicom_series(PHILIPS_TILTED, names)
    assert any(f.startswith("gantry_tilt_corrected:18.") for f in volume.meta["flags"])
    paths = [PHILIPS_TILTED / n for n in names]
    result = agreement(regular(volume), paths, stride=2)
    report("Philips -18.5 deg, 2.5 mm, regular lattice", result)
    assert result.outside == 0
    assert result.mean_abs_hu < 6
    # at 1 mm the 0.48 mm pixels' detail is gone whichever way the grid is made; one interpolation keeps more
    one = agreement(isotropic_volume(volume, spacing_mm=1.0), paths, stride=2)
    two = agreement(isotropic_volume(regular(volume), spacing_mm=1.0), paths, stride=2)
    report("Philips -18.5 deg, 2.5 mm, 1 mm in one pass", one)
    report("Philips -18.5 deg, 2.5 mm, 1 mm after the regular lattice", two)
    assert one.outside == 0 and two.outside == 0
    assert one.mean_abs_hu < two.mean_abs_hu


@pytest.mark.skipif(not PHILIPS_TILTED.is_dir(), reason=f"real Philips CT not present at {PHILIPS_TILTED}")
@pytest.mark.skipif(DCM2NIIX is None, reason="dcm2niix not installed (pip install dcm2niix)")
def test_real_tilted_philips_series_matches_dcm2niix_tilt_correction(tmp_path):
    """dcm2niix's tilt-corrected output (``_Tilt_1``) grows the field of view the same way: same grid, same HU."""
    import nibabel as nib

    names = sorted(p.name for p in PHILIPS_TILTED.iterdir() if p.name.startswith("I"))
    (tmp_path / "in").mkdir()
    for name in names:
        shutil.copy(PHILIPS_TILTED / name, tmp_path / "in" / name)
    command = [DCM2NIIX, "-z", "n", "-f", "x", "-o", str(tmp_path), str(tmp_path / "in")]
    subprocess.run(command, check=True, capture_output=True)
    theirs = nib.load(tmp_path / "x_Tilt_1.nii")
    ours = regular(load_dicom_series(PHILIPS_TILTED, names))
    their_hu = np.asarray(theirs.dataobj, dtype=np.float32)  # [x, y, z]
    ijk = np.stack(np.meshgrid(*(np.arange(0, n, 2) for n in their_hu.shape), indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ theirs.affine[:3, :3].T + theirs.affine[:3, 3]
    values, inside = sample(ours, ras * np.array([-1.0, -1.0, 1.0]))  # sample() takes LPS
    head = their_hu[tuple(ijk.T)] > HEAD_HU
    assert inside.all()
    delta = float(np.abs(values[head] - their_hu[tuple(ijk.T)][head]).mean())
    log.info("Philips vs dcm2niix tilt-corrected: mean |dHU| %.2f in the head", delta)
    assert sorted(ours.array.shape) == sorted(their_hu.shape)
    assert delta < 1.0


@pytest.mark.parametrize(
    "orientation",
    [(1, 0, 0, 0, -1, 0), (0, 1, 0, 1, 0, 0), (0, 1, 0, 0, 0, -1)],
    ids=["flipped-z", "swapped-xy", "sagittal"],
)
def test_a_stack_stored_feet_first_or_transposed_keeps_its_true_positions(tmp_path, orientation):
    """Slices whose normal points to the feet (the volume's z axis reversed on the way to RAS) or whose rows run
    along y (x and y swapped): the stack's positions and shifts follow the axes, so a linear ramp comes back. A
    sagittal stack (its slices are not the RAS volume's z) is blended onto its regular lattice when loaded."""
    spec = replace(zones_spec(boundary=2.0, tilt_deg=15.0, rows=96), orientation=orientation)
    write_ramp(tmp_path / "s", spec)
    volume, paths = assemble_files(tmp_path / "s")
    assert (volume.stack is None) == (orientation[5] != 0)
    for name, made in (("regular lattice", regular(volume)), ("1 mm", isotropic_volume(volume, spacing_mm=1.0))):
        result = agreement(made, paths, above=-1000, margin=4)
        report(f"ramp, zones 4/7 mm, tilt +15, orientation {orientation}, {name}", result)
        assert result.mean_abs_hu < 0.5, name
