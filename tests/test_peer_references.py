"""Other groups' models as their own code runs them: the authors' packages, installed by ``make peers`` into
``.peers/`` (without their dependencies: torch, MONAI and huggingface_hub come from this environment; the text
and report-generation parts of merlin-vlm, which need transformers and peft, are never imported; torchvision,
for the ResNet merlin-vlm inflates, is imported only in a child process), are the references.

* CT-FM: ``lighter_zoo.SegResEncoder`` with CT-FM's configuration and seeded random weights, saved with its
  ``save_pretrained``, loads strictly through ``load_encoder("ct-fm", weights=...)`` and gives the same pooled
  features on an asymmetric input.
* Merlin's encoder: merlin-vlm's own ``I3ResNet`` (built from torchvision's ResNet-152 with seeded random weights
  and randomised BatchNorm statistics, in a separate process: ``peer_merlin_reference.py``) saved in the released
  checkpoint's layout loads strictly through ``load_encoder("merlin", weights=...)`` and gives the same pooled
  features on an asymmetric input.
* Merlin's preprocessing: its package's own MONAI chain (``merlin/data/monai_transforms.py``) and hctembed's
  Merlin preset give the same model input on an obliquely stored, anisotropic NIfTI (mean |difference| reported
  in BENCHMARKS.md).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import head_phantom_xyz, write_nifti

PEERS = Path(__file__).resolve().parents[1] / ".peers"
pytestmark = pytest.mark.skipif(
    not (PEERS / "lighter_zoo").is_dir() or not (PEERS / "merlin").is_dir(),
    reason="the authors' packages are not installed in .peers/ (`make peers`; `make test` does it)",
)


def test_ctfm_equals_lighter_zoo_segresencoder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(PEERS))
    from lighter_zoo import SegResEncoder

    from hctembed.model.encoders import load_encoder

    torch.manual_seed(0)
    reference = SegResEncoder(spatial_dims=3, in_channels=1, init_filters=32, blocks_down=(1, 2, 2, 4, 4)).eval()
    reference.save_pretrained(tmp_path)
    encoder = load_encoder("ct-fm", weights=tmp_path / "model.safetensors")
    x = torch.rand(2, 1, 64, 48, 56, generator=torch.Generator().manual_seed(1))  # no two axes alike
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(reference(x)[-1].mean(dim=(2, 3, 4)), dim=1)
        ours = torch.as_tensor(encoder.model.embed(x))
    assert ours.shape == (2, 512)
    assert float((theirs - ours).abs().max()) < 1e-6


def _merlin_transforms():
    """merlin-vlm's image transforms, loaded from their file (the package's __init__ imports transformers)."""
    spec = importlib.util.spec_from_file_location(
        "merlin_monai_transforms", PEERS / "merlin" / "data" / "monai_transforms.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ImageTransforms


def test_merlin_preprocessing_equals_merlin_vlm_transforms(tmp_path):
    from hctembed.io.nifti import load_nifti
    from hctembed.model.merlin import MERLIN_PREPROCESS
    from hctembed.preprocessing import preprocess

    hu, affine = head_phantom_xyz(shape_xyz=(160, 150, 40), spacing=(1.2, 1.3, 4.0), seed=3)
    affine = affine.copy()
    affine[0, :3] *= -1  # stored left-to-right flipped: the orientation step must matter
    path = write_nifti(tmp_path / "scan.nii.gz", hu, affine)
    theirs = torch.as_tensor(_merlin_transforms()({"image": str(path)})["image"]).float()
    ours = preprocess(load_nifti(path), config=MERLIN_PREPROCESS)
    assert ours.shape == theirs.shape == (1, 224, 224, 160)
    assert float((ours - theirs).abs().mean()) < 1e-6 and float(np.abs(ours.numpy()).sum()) > 0


@pytest.mark.skipif(not (PEERS / "torchvision").is_dir(), reason="torchvision is not installed in .peers/")
def test_merlin_encoder_equals_merlin_vlm_i3resnet(tmp_path):
    from hctembed.model.encoders import load_encoder

    x = torch.rand(2, 1, 64, 48, 32, generator=torch.Generator().manual_seed(2))  # [B, 1, X, Y, Z], no axes alike
    torch.save(x, tmp_path / "x.pt")
    script = Path(__file__).with_name("peer_merlin_reference.py")
    env = {**os.environ, "PYTHONPATH": str(PEERS)}
    done = subprocess.run([sys.executable, str(script), str(PEERS), str(tmp_path / "x.pt"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(tmp_path / "features.pt", weights_only=True)["features"]
    encoder = load_encoder("merlin", weights=tmp_path / "merlin.pt")
    with torch.no_grad():
        ours = encoder.model.features(x)
    assert ours.shape == theirs.shape == (2, 2048)
    scale = float(theirs.abs().max())
    assert scale > 0 and float((ours - theirs).abs().max()) <= 1e-5 * scale
