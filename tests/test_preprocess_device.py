"""Preprocessing on a device (``embed --preprocess-device cuda``): the DataLoader workers only decode, and the
resample, windows and crop run in the main process on the device. The same code runs here on the CPU and must
agree with the workers' path (the streamed ``.nii.gz`` and the DICOM path) to mean |difference| < 1e-4, give
the same vectors, and keep every failure and skip to its own scan. On a machine with CUDA, the GPU is
compared with the CPU too."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from body_phantoms import PIXEL_MM, body_slices
from conftest import head_phantom_xyz, write_nifti
from dicom_factory import SeriesSpec, write_series
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.config import PreprocessConfig
from hctembed.embedding.loading import Loading, encode_refs
from hctembed.io.archive import load_series, scan_archive
from hctembed.model.encoders import load_encoder
from hctembed.preprocessing import preprocess
from hctembed.preprocessing.series import prepare

CONFIG = PreprocessConfig()


@pytest.fixture
def archive(tmp_path, monkeypatch):
    monkeypatch.setenv("HCTEMBED_SECRET", str(tmp_path / "secret.key"))
    root = tmp_path / "archive"
    root.mkdir()
    for i in range(3):
        hu, affine = head_phantom_xyz(shape_xyz=(40, 40, 20), spacing=(4.0, 4.0, 8.0), seed=i)
        write_nifti(root / f"head{i}.nii.gz", hu, affine)
    write_series(root / "dicom", SeriesSpec(n=14, seed=4, tilt_deg=12.0))
    chest = body_slices("chest", n=10, width_cm=34, depth_cm=24)
    nib.save(
        nib.Nifti1Image(np.transpose(chest, (2, 1, 0)), np.diag([PIXEL_MM, PIXEL_MM, 5.0, 1.0])), root / "chest.nii.gz"
    )
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip at all")
    return root


def test_preprocessing_on_the_device_equals_the_workers_path(archive):
    refs = [r for r in scan_archive(archive).selected if r.location != "broken.nii.gz" and "chest" not in r.location]
    assert {r.format for r in refs} == {"nifti", "dicom"}
    for ref in refs:
        in_workers, _ = prepare(ref, config=CONFIG)  # the streamed .nii.gz, or the DICOM path
        on_device = preprocess(load_series(ref), config=CONFIG, device="cpu")
        assert on_device.shape == in_workers.shape
        assert float((on_device - in_workers).abs().mean()) < 1e-4


@pytest.mark.parametrize("workers", [0, 1])
def test_embedding_with_preprocessing_on_the_device_gives_the_same_outcomes_and_vectors(archive, workers):
    encoder = load_encoder("vit-micro")
    refs = scan_archive(archive).selected
    todo = list(enumerate(refs))

    def run(loading):
        outcomes, vectors = [], []
        for o, v in encode_refs(todo, encoder=encoder, batch_size=2, num_workers=workers, loading=loading):
            outcomes += o
            vectors.append(v)
        return outcomes, np.concatenate(vectors)

    base_outcomes, base = run(Loading())
    device_outcomes, device = run(Loading(preprocess_device="cpu"))
    status = {o.source: (o.status, (o.reason or "").split(":")[0]) for o in device_outcomes}
    assert status == {o.source: (o.status, (o.reason or "").split(":")[0]) for o in base_outcomes}
    assert status["chest.nii.gz"] == ("skipped", "not_head") and status["broken.nii.gz"][0] == "failed"
    assert sum(s == "embedded" for s, _ in status.values()) == 4
    assert np.allclose(device, base, atol=1e-5)
    planes = [o.planes for o in device_outcomes if o.status == "embedded"]
    assert all(p is not None for p in planes)


def test_a_preprocess_device_that_is_not_there_is_a_one_line_error(archive, tmp_path):
    runner = CliRunner()
    db = tmp_path / "h.duckdb"
    embed = ["embed", str(archive), "--db", str(db), "--model", "vit-micro"]
    bad = runner.invoke(app, [*embed, "--preprocess-device", "tpu"])
    assert bad.exit_code == 2 and "--preprocess-device must be" in bad.output
    if not torch.cuda.is_available():
        none = runner.invoke(app, [*embed, "--preprocess-device", "cuda"])
        assert none.exit_code == 2 and "no CUDA device" in none.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_the_gpu_agrees_with_the_cpu(archive):
    for ref in scan_archive(archive).selected[:2]:
        volume = load_series(ref)
        cpu = preprocess(volume, config=CONFIG, device="cpu")
        gpu = preprocess(volume, config=CONFIG, device="cuda").cpu()
        assert float((gpu - cpu).abs().mean()) < 1e-4
