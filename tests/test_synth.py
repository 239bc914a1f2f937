"""Tests of the synthetic head-CT generator (:mod:`hctembed.synth`): archive files and labels,
determinism, HU realism, where each haemorrhage subtype lands, and storage orientation."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from hctembed.synth import (
    LABEL_COLUMNS,
    SUBTYPES,
    ScanProtocol,
    SynthConfig,
    Tissue,
    choose_subtypes,
    generate_archive,
    make_patient,
    read_labels,
    sample_protocol,
    synth_labels,
    synth_scan,
)
from hctembed.synth.anatomy import INTRACRANIAL, PARENCHYMA

SMALL = SynthConfig(matrix=64, slice_thickness_mm=(1.0, 5.0))
N_SCANS = 7
BONE = (Tissue.BONE_CORTICAL, Tissue.BONE_DIPLOE)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archive")
    generate_archive(out, n=N_SCANS, seed=11, config=SMALL)
    return out


def _protocol(**changes: object) -> ScanProtocol:
    """A fixed, fast protocol: 128 matrix, 1.25 mm slices covering z -22..+42 mm, no noise."""
    base = ScanProtocol(
        manufacturer="SYNTHA",
        matrix=128,
        n_slices=52,
        pixel_spacing_mm=1.875,
        slice_thickness_mm=1.25,
        noise_hu=0.0,
        rotation_deg=(2.0, -3.0, 4.0),
        kernel_sharpness=1.0,
        storage="RAS",
        center_mm=(0.0, 0.0, 10.0),
    )
    return dataclasses.replace(base, **changes)


def _world(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """World coordinates ``[N, 3]`` of the voxels in ``mask``."""
    ijk = np.argwhere(mask).astype(float)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


# --- archive ---------------------------------------------------------------------------------------------


def test_archive_labels_and_files(archive: Path) -> None:
    rows = read_labels(archive / "labels.csv")
    header = (archive / "labels.csv").read_text().splitlines()[0]
    assert header == ",".join(LABEL_COLUMNS)
    assert header.startswith("scan_id,patient_id,EDH,SDH,IPH,IVH,SAH,manufacturer,pixel_spacing_mm")
    assert len(rows) == N_SCANS
    by_patient: dict[str, set[tuple[str, ...]]] = {}
    for row in rows:
        assert re.fullmatch(r"synth-p\d{4}-s\d+", row["scan_id"])
        assert row["scan_id"].startswith(row["patient_id"] + "-")
        assert row["manufacturer"] in ("SYNTHA", "SYNTHB")
        assert row["storage"] in ("RAS", "LPS")
        assert row["file"] == row["scan_id"] + ".nii.gz"
        hu, _ = _load(archive / row["file"])
        assert hu.dtype == np.int16
        assert hu.shape == (64, 64, int(row["n_slices"]))
        assert int(row["n_slices"]) >= 10
        assert 0 < float(row["rotation_deg"]) <= SMALL.max_rotation_deg
        by_patient.setdefault(row["patient_id"], set()).add(tuple(row[k] for k in SUBTYPES))
    assert all(len(labels) == 1 for labels in by_patient.values())
    assert len(by_patient) < N_SCANS, "expected at least one patient with several scans"


def test_archive_affine_matches_labels(archive: Path) -> None:
    for row in read_labels(archive / "labels.csv"):
        _, affine = _load(archive / row["file"])
        norms = np.linalg.norm(affine[:3, :3], axis=0)
        np.testing.assert_allclose(norms[:2], float(row["pixel_spacing_mm"]), rtol=1e-5)
        np.testing.assert_allclose(norms[2], float(row["slice_thickness_mm"]), rtol=1e-5)
        diagonal_sign = np.sign(np.diag(affine)[:3])
        expected = [-1, -1, 1] if row["storage"] == "LPS" else [1, 1, 1]
        np.testing.assert_array_equal(diagonal_sign, expected)


def test_archive_deterministic(archive: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_archive(again, n=N_SCANS, seed=11, config=SMALL, workers=2)  # processes change nothing
    assert (again / "labels.csv").read_bytes() == (archive / "labels.csv").read_bytes()
    for row in read_labels(archive / "labels.csv"):
        a, affine_a = _load(archive / row["file"])
        b, affine_b = _load(again / row["file"])
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(affine_a, affine_b)

    other = tmp_path / "other"
    done: list[int] = []
    generate_archive(other, n=2, seed=12, config=SMALL, progress=done.append)
    assert done == [1, 2]
    first = read_labels(other / "labels.csv")[0]
    a, _ = _load(archive / "synth-p0001-s1.nii.gz")
    b, _ = _load(other / first["file"])
    assert a.shape != b.shape or not np.array_equal(a, b)


def test_lps_storage_reorients_to_ras() -> None:
    patient = make_patient(patient_id="synth-p0001", subtypes=frozenset(), rng=np.random.default_rng(3))
    protocol = _protocol(matrix=48, pixel_spacing_mm=5.0, slice_thickness_mm=5.0, n_slices=12, noise_hu=5.0)
    ras, affine_ras = synth_scan(patient=patient, protocol=protocol, rng=np.random.default_rng(1))
    lps_protocol = dataclasses.replace(protocol, storage="LPS")
    lps, affine_lps = synth_scan(patient=patient, protocol=lps_protocol, rng=np.random.default_rng(1))
    assert np.all(np.diag(affine_lps)[:2] < 0)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(lps, affine_lps))
    assert np.all(np.diag(canonical.affine)[:3] > 0)
    np.testing.assert_allclose(canonical.affine, affine_ras, atol=1e-9)
    np.testing.assert_array_equal(np.asarray(canonical.dataobj), ras)


# --- protocols and subtype mix ---------------------------------------------------------------------------


def test_sample_protocol_ranges() -> None:
    config = SynthConfig(matrix=128, slice_thickness_mm=(0.5, 5.0), max_rotation_deg=6.0)
    rng = np.random.default_rng(0)
    protocols = [sample_protocol(rng=rng, config=config) for _ in range(300)]
    for p in protocols:
        assert 0.5 <= p.slice_thickness_mm <= 5.0
        assert abs(p.pixel_spacing_mm / (240.0 / 128) - 1.0) <= 0.031
        assert 3.0 <= p.noise_hu <= 10.0
        assert max(abs(a) for a in p.rotation_deg) <= 6.0
        assert p.n_slices == max(10, round(170.0 / p.slice_thickness_mm))
    lps = np.mean([p.storage == "LPS" for p in protocols])
    assert 0.2 < lps < 0.4
    noise = {m: np.mean([p.noise_hu for p in protocols if p.manufacturer == m]) for m in ("SYNTHA", "SYNTHB")}
    sharp = {m: np.mean([p.kernel_sharpness for p in protocols if p.manufacturer == m]) for m in noise}
    assert noise["SYNTHB"] > noise["SYNTHA"] and sharp["SYNTHB"] < sharp["SYNTHA"]
    assert len({p.slice_thickness_mm for p in protocols}) >= 5


def test_subtype_prevalence_and_cooccurrence() -> None:
    rng = np.random.default_rng(0)
    combos = [choose_subtypes(rng=rng, normal_fraction=0.35) for _ in range(4000)]
    for kind in SUBTYPES:
        assert 0.15 <= np.mean([kind in c for c in combos]) <= 0.25
    assert 0.3 <= np.mean([not c for c in combos]) <= 0.4
    assert np.mean([len(c) >= 2 for c in combos]) > 0.05


# --- HU realism --------------------------------------------------------------------------------------------


def test_hu_realism() -> None:
    patient = make_patient(patient_id="synth-p0001", subtypes=frozenset(), rng=np.random.default_rng(5))
    protocol = _protocol(slice_thickness_mm=2.5, n_slices=24, noise_hu=5.0, kernel_sharpness=0.7)
    hu, _ = synth_scan(patient=patient, protocol=protocol, rng=np.random.default_rng(0))
    labels = synth_labels(patient=patient, protocol=protocol)
    core = np.ones((3, 3, 3), dtype=bool)

    def region(*tissues: Tissue) -> np.ndarray:
        return ndimage.binary_erosion(np.isin(labels, tissues), structure=core)

    air = region(Tissue.AIR) & ~np.isin(labels, BONE)
    assert abs(np.median(hu[air]) + 1000) < 10
    brain = region(Tissue.GREY, Tissue.WHITE, Tissue.DEEP_GREY)
    assert brain.sum() > 10_000
    assert np.mean((hu[brain] >= 20) & (hu[brain] <= 45)) > 0.85
    assert 25 <= np.median(hu[brain]) <= 38
    ventricles = region(Tissue.VENTRICLE)
    assert ventricles.sum() > 30
    assert 0 <= np.median(hu[ventricles]) <= 15

    # A ring of bone: every ray from the head centre in the mid slice crosses > 700 HU.
    k = hu.shape[2] // 2
    centre = ((hu.shape[0] - 1) / 2, (hu.shape[1] - 1) / 2)  # the grid is centred near the head centre
    radius = np.arange(0, 62, 0.5)
    for angle in np.linspace(0, 2 * np.pi, 36, endpoint=False):
        i = np.clip(np.round(centre[0] + radius * np.cos(angle)).astype(int), 0, 127)
        j = np.clip(np.round(centre[1] + radius * np.sin(angle)).astype(int), 0, 127)
        assert hu[i, j, k].max() > 700, f"no skull along the ray at {np.degrees(angle):.0f} deg"
    assert np.mean(hu[:, :, k] > 700) < 0.2


# --- haemorrhage subtypes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def normal_scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free scan and labels of the lesion-free twin of the subtype tests' patient."""
    patient = make_patient(patient_id="synth-p0001", subtypes=frozenset(), rng=np.random.default_rng(21))
    protocol = _protocol()
    hu, affine = synth_scan(patient=patient, protocol=protocol, rng=np.random.default_rng(0))
    return hu.astype(np.float32), affine, synth_labels(patient=patient, protocol=protocol)


@pytest.mark.parametrize("kind", SUBTYPES)
def test_subtype_lesion_location(kind: str, normal_scan: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    without, affine, labels = normal_scan
    rng = np.random.default_rng(21)
    patient = make_patient(patient_id="synth-p0001", subtypes=frozenset({kind}), rng=rng)
    protocol = _protocol()
    with_, affine_with = synth_scan(patient=patient, protocol=protocol, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(affine, affine_with)
    with_ = with_.astype(np.float32)
    lesion = (with_ - without > 15) & (with_ >= 50) & (with_ <= 90)
    assert lesion.sum() > 40, f"{kind}: only {lesion.sum()} lesion voxels"

    # Hyperdense acute blood.
    assert 55 <= np.median(with_[lesion]) <= 80
    assert np.percentile(with_[lesion], 90) <= 82

    # Visible in the mid axial region.
    z = _world(affine, lesion)[:, 2]
    assert np.sum((z > -10) & (z < 35)) > 30, f"{kind} not visible in the mid axial slices"

    def fraction_inside(mask: np.ndarray) -> float:
        return float(np.mean(mask[lesion]))

    spacing = (protocol.pixel_spacing_mm, protocol.pixel_spacing_mm, protocol.slice_thickness_mm)
    to_bone = ndimage.distance_transform_edt(~np.isin(labels, BONE), sampling=spacing)
    intracranial = np.isin(labels, INTRACRANIAL)
    if kind in ("EDH", "SDH"):
        assert fraction_inside(to_bone <= 25.0) > 0.95
        assert fraction_inside(intracranial) > 0.9
    elif kind == "IVH":
        ventricles = np.isin(labels, (Tissue.VENTRICLE, Tissue.CALCIFICATION))
        assert fraction_inside(ndimage.binary_dilation(ventricles)) > 0.95
    elif kind == "IPH":
        assert fraction_inside(np.isin(labels, PARENCHYMA) | intracranial) > 0.97
        assert fraction_inside(to_bone > 6.0) > 0.95
        solid = ndimage.binary_erosion(lesion)
        assert solid.sum() / lesion.sum() > 0.4, "IPH should be a solid blob"
    else:  # SAH: thin, in CSF spaces
        assert fraction_inside(intracranial) > 0.9
        solid = ndimage.binary_erosion(lesion)
        assert solid.sum() / lesion.sum() < 0.3, "SAH should be thin"


def test_same_anatomy_whatever_the_subtypes() -> None:
    a = make_patient(patient_id="synth-p0001", subtypes=frozenset(), rng=np.random.default_rng(4))
    b = make_patient(patient_id="synth-p0001", subtypes=frozenset(SUBTYPES), rng=np.random.default_rng(4))
    assert a.anatomy.axes_mm == b.anatomy.axes_mm
    np.testing.assert_array_equal(a.anatomy.sulci.values, b.anatomy.sulci.values)
    assert [lesion.kind for lesion in b.lesions] == list(SUBTYPES)
    with pytest.raises(ValueError, match="unknown"):
        make_patient(patient_id="synth-p0001", subtypes=frozenset({"XYZ"}), rng=np.random.default_rng(4))


def test_lesion_scale_grows_every_scaled_bleed_and_one_changes_nothing():
    """``lesion_scale`` multiplies each bleed's linear size with the same random draws: 1.0 is the default patient
    exactly, and the labelled bleed voxels grow with the scale (EDH/SDH extent x thickness, IPH and SAH reach)."""
    from hctembed.synth.anatomy import Tissue
    from hctembed.synth.patient import render_points

    grid = np.stack(np.meshgrid(*(np.arange(-96.0, 96.0, 3.0),) * 3, indexing="ij"), -1).reshape(-1, 3)
    counts = {}
    for scale in (1.0, 1.6):
        for kind in ("EDH", "SDH", "IPH", "SAH"):
            patient = make_patient(patient_id="synth-p0001", subtypes=frozenset({kind}), rng=np.random.default_rng(7),
                                   lesion_scale=scale)  # fmt: skip
            labels, _ = render_points(patient=patient, pts=grid.astype(np.float32))
            counts[kind, scale] = int((labels == int(getattr(Tissue, kind))).sum())
    default = make_patient(patient_id="synth-p0001", subtypes=frozenset({"IPH"}), rng=np.random.default_rng(7))
    assert make_patient(patient_id="synth-p0001", subtypes=frozenset({"IPH"}), rng=np.random.default_rng(7),
                        lesion_scale=1.0).lesions == default.lesions  # fmt: skip
    for kind in ("EDH", "SDH", "IPH", "SAH"):
        assert counts[kind, 1.6] > 1.5 * counts[kind, 1.0] > 0, (kind, counts)
    with pytest.raises(Exception, match="lesion scale"):
        make_patient(patient_id="synth-p0001", subtypes=frozenset({"SAH"}), rng=np.random.default_rng(7),
                     lesion_scale=9.0)  # fmt: skip
