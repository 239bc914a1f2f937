"""The fine-tuned network: an encoder (ViT3D) and a classification layer with two logits per task on its CLS
token, its mean patch token or an attention-pooled patch token (cross-entropy, as the paper's classifiers)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hctembed.config import VIT_PRESETS
from hctembed.model.attention_pool import AttentionPool
from hctembed.model.vit3d import ViT3D

POOLS = ("cls", "mean", "attentive")
HEAD_PARTS = ("attend", "head")  # trained at the head's learning rate


class Classifier(nn.Module):
    """``x [B, C, Z, Y, X]`` -> logits ``[B, T, 2]``.

    ``pool``: the CLS token (what ``embed`` stores), the mean patch token, or ``attentive``: a learned query attending
    over the patch tokens (:class:`AttentionPool`, part of the head), so that a focal finding in a few of hundreds
    of patches is not averaged away. ``head_norm``: the pooled features are
    standardised over the batch (BatchNorm without affine parameters, as MAE's linear probe) before the linear layer:
    a freshly initialised ViT gives nearly the same CLS vector for every head CT (cosine ~0.999), and without it the
    head barely sees the differences."""

    def __init__(self, backbone: ViT3D, *, n_tasks: int, pool: str = "cls", head_norm: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_tasks = n_tasks
        self.pool = pool
        self.attend = AttentionPool(backbone.config.dim, heads=backbone.config.heads) if pool == "attentive" else None
        self.norm = nn.BatchNorm1d(backbone.config.dim, affine=False) if head_norm else nn.Identity()
        self.head = nn.Linear(backbone.config.dim, 2 * n_tasks)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone.forward_features(x)
        if self.pool == "cls":
            return tokens[:, 0]
        patches = tokens[:, self.backbone.num_prefix_tokens :]
        return patches.mean(1) if self.attend is None else self.attend(patches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x))).view(x.shape[0], self.n_tasks, 2)

    @torch.no_grad()
    def positive_probability(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` probability of the positive class."""
        return self(x).softmax(-1)[..., 1]


def build_classifier(
    *, model: str, weights: Path | None, n_tasks: int, seed: int, pool: str = "cls", head_norm: bool = True
) -> tuple[Classifier, dict]:
    """A classifier on ``weights`` (strictly loaded; the file decides the architecture) or on a random ``model``
    encoder; returns it with a description of its initialisation."""
    from hctembed.model.checkpoint import load_encoder_weights

    torch.manual_seed(seed)
    if weights is not None:
        backbone, digest = load_encoder_weights(weights)
        init = {"init": "weights", "weights": str(Path(weights).resolve()), "weights_digest": digest}
    else:
        backbone = ViT3D(VIT_PRESETS[model])
        init = {"init": "scratch", "seed": seed}
    torch.manual_seed(seed + 1)  # the head's initialisation does not depend on the backbone's
    return Classifier(backbone, n_tasks=n_tasks, pool=pool, head_norm=head_norm), init | {"model": backbone.config.name}
