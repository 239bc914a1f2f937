"""SimCLR: the NT-Xent loss against a brute-force reference, the model's shapes, and a run that learns pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from hctembed.config import VIT_PRESETS
from hctembed.model.vit3d import ViT3D
from hctembed.pretrain.simclr import ContrastiveModel, nt_xent


def _reference(z: np.ndarray, temperature: float) -> tuple[float, float]:
    """Row by row: -log of the partner's share among all other rows, and whether the partner is the nearest."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n, b = len(z), len(z) // 2
    losses, hits = [], []
    for i in range(n):
        partner = (i + b) % n
        others = [j for j in range(n) if j != i]
        s = np.array([z[i] @ z[j] for j in others]) / temperature
        losses.append(logsumexp(s) - (z[i] @ z[partner]) / temperature)
        hits.append(others[int(np.argmax(s))] == partner)
    return float(np.mean(losses)), float(np.mean(hits))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_the_brute_force_definition(temperature):
    z = torch.randn(10, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, hits = nt_xent(z, temperature=temperature)
    want_loss, want_hits = _reference(z.numpy(), temperature)
    assert float(loss) == pytest.approx(want_loss, rel=1e-6)
    assert float(hits) == pytest.approx(want_hits)
    # views identical to their partners and far from the rest: every row finds its partner
    a = torch.eye(5, dtype=torch.float64) * 10
    loss, hits = nt_xent(torch.cat([a, a]), temperature=0.1)
    assert float(hits) == 1.0 and float(loss) < 1e-3
    with pytest.raises(ValueError, match="two views"):
        nt_xent(torch.randn(5, 3), temperature=0.1)


def test_contrastive_model_projects_the_cls_token():
    torch.manual_seed(0)
    backbone = ViT3D(VIT_PRESETS["vit-micro"])
    model = ContrastiveModel(backbone, hidden=32, out_dim=16).eval()
    x = torch.rand(3, 3, 48, 48, 48)
    with torch.no_grad():
        z, cls = model(x)
        assert z.shape == (3, 16) and cls.shape == (3, 96)
        torch.testing.assert_close(cls, backbone(x))
        torch.testing.assert_close(z, model.projector(cls))
