"""Masked autoencoding for the 3D ViT: random masking, encoder on the visible patches, a light decoder.

The encoder is the :class:`~hctembed.model.vit3d.ViT3D` itself (its patch embedding, position embedding,
prefix tokens, blocks and final norm), so the pretrained weights export as a plain encoder. The decoder
has its own width, blocks and fixed 3D sine-cosine position embedding.

What the decoder predicts for each masked patch (``MAEConfig.target``):

- ``"pixels"``: its voxels (the MAE paper's; with ``norm_pix_loss`` each patch minus its mean over its spread), scored
  by mean squared error;
- ``"histogram"``: its intensity histogram per window channel (``histogram_bins`` equal bins of the windowed [0, 1]
  range), scored by the KL divergence from the true one (a hand-made target in the manner of MaskFeat's HOG). A
  patch's tissue make-up (how much of it is blood-dense, brain, fluid, bone) is then what the encoder must carry
  from the visible patches to the masked ones, rather than where each edge of the skull lies, which dominates the
  squared error on voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from hctembed.config import ViTConfig
from hctembed.model.pos_embed import sincos_3d
from hctembed.model.vit3d import Block, ViT3D


@dataclass(frozen=True)
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 384  # a multiple of 6 (3D sine-cosine embedding) and of decoder_heads
    decoder_depth: int = 8
    decoder_heads: int = 12
    norm_pix_loss: bool = False
    target: str = "pixels"  # "pixels" or "histogram" (see the module docstring)
    histogram_bins: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError("mask_ratio must be in (0, 1)")
        if self.target not in MAE_TARGETS:
            raise ValueError(f"unknown MAE target {self.target!r}; use {' or '.join(MAE_TARGETS)}")
        if self.norm_pix_loss and self.target != "pixels":
            raise ValueError("norm_pix_loss applies to pixel targets only")
        if self.histogram_bins < 2:
            raise ValueError("histogram_bins must be >= 2")


MAE_TARGETS = ("pixels", "histogram")


def random_masking(x: torch.Tensor, *, mask_ratio: float, generator: torch.Generator | None = None):
    """Keep a random ``1 - mask_ratio`` of the tokens of each sample (argsort of uniform noise).

    Args:
        x: ``[B, N, D]`` patch tokens.
    Returns:
        ``(visible [B, N_keep, D], mask [B, N] with 1 = masked, ids_restore [B, N])``; gathering
        ``cat(visible, masked)`` with ``ids_restore`` puts tokens back in their original order.
    """
    b, n, d = x.shape
    keep = round(n * (1 - mask_ratio))
    noise = torch.rand(b, n, generator=generator, device="cpu").to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    visible = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_restore


def patchify(x: torch.Tensor, *, patch: int) -> torch.Tensor:
    """``[B, C, Z, Y, X]`` -> ``[B, N, p³·C]`` with patches in ``[Z, Y, X]`` raster order (as the conv
    patch embedding flattens them) and each patch's values in (pz, py, px, c) order."""
    b, c, z, y, w = x.shape
    gz, gy, gx = z // patch, y // patch, w // patch
    t = x.reshape(b, c, gz, patch, gy, patch, gx, patch)
    t = t.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, gz, gy, gx, pz, py, px, C]
    return t.reshape(b, gz * gy * gx, patch**3 * c)


def patch_histograms(x: torch.Tensor, *, patch: int, bins: int) -> torch.Tensor:
    """Each patch's intensity histogram per channel: ``[B, C, Z, Y, X]`` in [0, 1] -> fractions ``[B, N, C, bins]``
    (patches in :func:`patchify` order; ``bins`` equal bins of [0, 1], values outside it counted in the end bins;
    each row sums to 1)."""
    c = x.shape[1]
    voxels = patchify(x, patch=patch).unflatten(-1, (patch**3, c)).transpose(-1, -2)  # [B, N, C, p³]
    index = (voxels.float() * bins).floor().clamp_(0, bins - 1).long()
    counts = torch.zeros(*voxels.shape[:-1], bins, device=x.device).scatter_add_(
        -1, index, torch.ones_like(index, dtype=torch.float32)
    )
    return counts / patch**3


def unpatchify(patches: torch.Tensor, *, patch: int, grid: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, grid³, p³·C]`` -> ``[B, C, grid·p, grid·p, grid·p]``."""
    b = patches.shape[0]
    t = patches.reshape(b, grid, grid, grid, patch, patch, patch, channels)
    t = t.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, gz, pz, gy, py, gx, px]
    return t.reshape(b, channels, grid * patch, grid * patch, grid * patch)


class MAE3D(nn.Module):
    """``forward(x [B, C, Z, Y, X]) -> (loss, pred [B, N, p³·C] or [B, N, C·bins] logits, mask [B, N])``."""

    def __init__(self, encoder: ViT3D, config: MAEConfig = MAEConfig()) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = config
        vit = encoder.config
        dec = replace(
            vit,
            name="mae-decoder",
            dim=config.decoder_dim,
            depth=config.decoder_depth,
            heads=config.decoder_heads,
            mlp_dim=4 * config.decoder_dim,
            register_tokens=0,
            stored_pos_embed=False,
        )
        self.decoder_embed = nn.Linear(vit.dim, config.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", sincos_3d(dim=config.decoder_dim, grid=vit.grid)[None], persistent=False
        )
        self.decoder_blocks = nn.ModuleList([Block(dec) for _ in range(config.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(config.decoder_dim, eps=vit.block_norm_eps)
        per_channel = config.histogram_bins if config.target == "histogram" else vit.patch_size**3
        self.decoder_pred = nn.Linear(config.decoder_dim, per_channel * vit.in_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def vit(self) -> ViTConfig:
        return self.encoder.config

    def encode(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        """Visible tokens through the encoder: ``([B, P + N_keep, D], mask [B, N], ids_restore [B, N])``."""
        tokens = self.encoder.tokens(x)  # [B, P + N, D], position embedding already on the patches
        p = self.encoder.num_prefix_tokens
        visible, mask, ids_restore = random_masking(
            tokens[:, p:], mask_ratio=self.config.mask_ratio, generator=generator
        )
        t = torch.cat([tokens[:, :p], visible], dim=1)
        for block in self.encoder.blocks:
            t = block(t)
        return self.encoder.norm(t), mask, ids_restore

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``[B, P + N_keep, D]`` -> predicted patches ``[B, N, p³·C]``."""
        p = self.encoder.num_prefix_tokens
        t = self.decoder_embed(latent)
        b, n = ids_restore.shape
        n_keep = t.shape[1] - p
        masked = self.mask_token.expand(b, n - n_keep, -1)
        patches = torch.cat([t[:, p:], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, t.shape[-1]))
        t = torch.cat([t[:, :p], patches + self.decoder_pos_embed], dim=1)
        for block in self.decoder_blocks:
            t = block(t)
        return self.decoder_pred(self.decoder_norm(t))[:, p:]

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Over the masked patches only: mean squared error against the voxels (per-patch normalised if configured),
        or the KL divergence of the predicted histograms from the true ones, averaged over channels."""
        if self.config.target == "histogram":
            per_patch = self._histogram_kl(x, pred)
            return (per_patch * mask).sum() / mask.sum()
        target = patchify(x, patch=self.vit.patch_size)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # [B, N]
        return (per_patch * mask).sum() / mask.sum()

    def _histogram_kl(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """KL(true || predicted) per patch ``[B, N]``, averaged over channels; ``pred`` ``[B, N, C·bins]`` logits."""
        bins = self.config.histogram_bins
        target = patch_histograms(x, patch=self.vit.patch_size, bins=bins)  # [B, N, C, bins]
        log_p = torch.log_softmax(pred.float().unflatten(-1, (self.vit.in_channels, bins)), dim=-1)
        return (torch.special.xlogy(target, target) - target * log_p).sum(-1).mean(-1)

    def predicted_patches(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The decoder's output in voxel space ``[B, N, p³·C]`` for pictures: pixel targets as they are
        (de-normalised with each patch's true mean and spread under ``norm_pix_loss``, as the MAE paper's pictures
        are); histogram targets as each patch filled with its predicted mean intensity per channel."""
        p3 = self.vit.patch_size**3
        if self.config.target == "histogram":
            bins = self.config.histogram_bins
            probs = torch.softmax(pred.float().unflatten(-1, (self.vit.in_channels, bins)), dim=-1)
            centres = (torch.arange(bins, device=pred.device, dtype=torch.float32) + 0.5) / bins
            means = probs @ centres  # [B, N, C]
            return means[:, :, None, :].expand(-1, -1, p3, -1).flatten(2)
        pred = pred.float()
        if self.config.norm_pix_loss:
            target = patchify(x, patch=self.vit.patch_size)
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1e-6) ** 0.5 + mean
        return pred

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, C, Z, Y, X]`` -> (the input with masked patches zeroed, the input with masked patches replaced by
        the prediction), both like ``x`` (voxel space, see :meth:`predicted_patches`)."""
        latent, mask, ids_restore = self.encode(x, generator=generator)
        pred = self.predicted_patches(x, self.decode(latent, ids_restore))
        target = patchify(x, patch=self.vit.patch_size)
        m = mask[..., None]
        shape = {"patch": self.vit.patch_size, "grid": self.vit.grid, "channels": self.vit.in_channels}
        return unpatchify(target * (1 - m), **shape), unpatchify(target * (1 - m) + pred * m, **shape)

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None):
        latent, mask, ids_restore = self.encode(x, generator=generator)
        pred = self.decode(latent, ids_restore)
        return self.loss(x, pred, mask), pred, mask
