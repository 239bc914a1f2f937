"""Shared fixtures: small real NIfTI phantoms written with nibabel, a tiny ViT, temporary databases."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest


def head_phantom_xyz(*, shape_xyz, spacing, seed=0, noise=4.0, lesion=True) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid head (scalp, skull, brain, optional bleed) in RAS; (hu [x, y, z] int16, affine).

    Each slice averages the object over its thickness (sub-slice samples 1 mm apart), as a CT slice does.
    """
    nx, ny, nz = shape_xyz
    sx, sy, sz = spacing
    centre = np.array([(nx - 1) * sx / 2, (ny - 1) * sy / 2, (nz - 1) * sz / 2])
    affine = np.diag([sx, sy, sz, 1.0])
    affine[:3, 3] = -centre
    x = np.arange(nx) * sx - centre[0]
    y = np.arange(ny) * sy - centre[1]
    n_sub = max(1, round(sz))
    offsets = (np.arange(n_sub) - (n_sub - 1) / 2) * (sz / n_sub)
    hu = np.zeros((nx, ny, nz))
    for dz in offsets:
        z = np.arange(nz) * sz - centre[2] + dz
        xx, yy, zz = np.meshgrid(x, y, z, indexing="ij")
        r = np.sqrt((xx / 70) ** 2 + (yy / 88) ** 2 + (zz / 80) ** 2)
        sub = np.full(r.shape, -1000.0)
        sub = np.where(r < 1.0, 40.0, sub)
        sub = np.where(r < 0.95, 1400.0, sub)
        sub = np.where(r < 0.88, 32.0, sub)
        if lesion:
            sub = np.where((xx - 25) ** 2 + (yy - 10) ** 2 + (zz - 5) ** 2 < 14**2, 70.0, sub)
        hu += sub / n_sub
    rng = np.random.default_rng(seed)
    hu = hu + rng.normal(0, noise, hu.shape)
    return hu.astype(np.int16), affine


def write_nifti(path: Path, hu_xyz: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(hu_xyz, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture
def phantom_file(tmp_path) -> Path:
    hu, affine = head_phantom_xyz(shape_xyz=(96, 96, 40), spacing=(2.0, 2.0, 4.5))
    return write_nifti(tmp_path / "phantom.nii.gz", hu, affine)
