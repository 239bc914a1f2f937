"""SimCLR-style contrastive pretraining: a projector on the CLS token and the NT-Xent loss over view pairs.

Each scan gives two views of the whole head (:func:`hctembed.augment.pair_views`); the loss asks each view to pick
its partner among the other ``2B - 1`` views of the process's batch, ``2B - 2`` of them negatives (cross-entropy over
cosine similarities divided by a temperature). The negatives are the process's own batch: under DDP each process
scores its own pairs, as the gradients are then averaged (the projector's BatchNorm is synchronised on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hctembed.model.vit3d import ViT3D


class ContrastiveModel(nn.Module):
    """``forward(x [N, C, Z, Y, X]) -> (projections [N, out_dim], CLS tokens [N, D])``: the backbone's CLS token
    through a 2-layer projector (BatchNorm, ReLU), SimCLR's."""

    def __init__(self, backbone: ViT3D, *, hidden: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.config.dim
        self.projector = nn.Sequential(
            nn.Linear(dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls = self.backbone(x)
        return self.projector(cls), cls


@torch.autocast("cuda", enabled=False)  # logits of +-1/T in bf16 would be off by about the solved task's loss
def nt_xent(z: torch.Tensor, *, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent over ``z`` ``[2B, D]`` whose rows ``i`` and ``i + B`` are the two views of one scan.

    Returns ``(loss, hits)``: the mean cross-entropy of picking each row's partner among the other ``2B - 1`` rows by
    cosine similarity / ``temperature``, and the fraction of rows whose most similar other row is their partner."""
    n = z.shape[0]
    if n % 2 or n < 4:
        raise ValueError(f"nt_xent needs two views of at least 2 scans, got {n} rows")
    b = n // 2
    z = F.normalize(z.float(), dim=-1)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(b, n), torch.arange(0, b)]).to(z.device)
    loss = F.cross_entropy(logits, partner)
    hits = (logits.argmax(dim=1) == partner).float().mean()
    return loss, hits.detach()
