"""A 3D Vision Transformer encoder (FM-HCT: ViT-Base, 3×96³ input, 512 patches of 12³)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hctembed.config import ViTConfig
from hctembed.errors import InputError
from hctembed.model.pos_embed import sincos_3d


class Attention(nn.Module):
    def __init__(self, *, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, T, D]`` -> queries, keys, values, each ``[B, H, T, D / H]``."""
        b, t, d = x.shape
        return self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        """x ``[B, T, D]`` -> ``[B, T, D]`` (and attention ``[B, H, T, T]`` when asked)."""
        b, t, d = x.shape
        q, k, v = self._qkv(x)
        if return_attention:
            attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            attn = attn.softmax(dim=-1)
            out = attn @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(b, t, d))
        return (out, attn) if return_attention else out

    def first_row(self, x: torch.Tensor) -> torch.Tensor:
        """The first token's softmax attention ``[B, H, T]`` (row 0 of what ``return_attention`` gives)."""
        q, k, _ = self._qkv(x)
        return ((q[:, :, :1] @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)).softmax(dim=-1)[:, :, 0]


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


def drop_path(x: torch.Tensor, *, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: in training, each sample's branch ``x [B, ...]`` is zeroed with probability ``rate`` and
    the kept ones scaled by 1 / (1 - rate); the identity in evaluation or at rate 0."""
    if not training or rate == 0.0:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)) (branches dropped at ``drop_rate`` in
    training)."""

    def __init__(self, config: ViTConfig, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.drop_rate = drop_rate
        self.norm1 = nn.LayerNorm(config.dim, eps=config.block_norm_eps)
        self.attn = Attention(dim=config.dim, heads=config.heads, qkv_bias=config.qkv_bias)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.block_norm_eps)
        self.mlp = Mlp(dim=config.dim, hidden=config.mlp_dim)

    def forward(self, x: torch.Tensor, *, return_attention: bool = False):
        if return_attention:
            a, attn = self.attn(self.norm1(x), return_attention=True)
            x = x + a
            return x + self.mlp(self.norm2(x)), attn
        x = x + drop_path(self.attn(self.norm1(x)), rate=self.drop_rate, training=self.training)
        return x + drop_path(self.mlp(self.norm2(x)), rate=self.drop_rate, training=self.training)


class ViT3D(nn.Module):
    """Tokens: ``[CLS, registers..., patches...]``; the fixed position embedding is added to patches only.

    Input ``[B, C, Z, Y, X]`` with Z = Y = X = ``config.image_size``; patches in ``[Z, Y, X]`` raster order.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        p = config.patch_size
        self.patch_embed = nn.Conv3d(config.in_channels, config.dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.register_tokens, config.dim)) if config.register_tokens else None
        )
        pos = sincos_3d(dim=config.dim, grid=config.grid)[None]  # [1, N, D]
        if config.stored_pos_embed:  # a tensor saved with the weights (e.g. an imported checkpoint's)
            self.pos_embed = nn.Parameter(pos)
        else:  # fixed, rebuilt from the config (never loaded from a checkpoint)
            self.register_buffer("pos_embed", pos, persistent=False)
        if config.input_norm == "standardise":  # fitted on the pretraining data (set_input_stats), saved with it
            self.register_buffer("input_mean", torch.zeros(config.in_channels))
            self.register_buffer("input_std", torch.ones(config.in_channels))
        # DINO's stochastic depth rule: rate i / (depth - 1) x drop_path for block i
        rates = [config.drop_path * i / max(1, config.depth - 1) for i in range(config.depth)]
        self.blocks = nn.ModuleList([Block(config, drop_rate=r) for r in rates])
        self.norm = nn.LayerNorm(config.dim, eps=config.final_norm_eps)
        self._init_weights()

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.config.register_tokens

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=0.02)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=0.02)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_input_stats(self, *, mean: torch.Tensor, std: torch.Tensor) -> None:
        """The per-channel statistics ``[C]`` of a standardising encoder (``input_norm="standardise"``)."""
        if self.config.input_norm != "standardise":
            raise InputError("this encoder takes its input as it is (input_norm 'none'): no statistics to set")
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        shape = (self.config.in_channels,)
        got = f"{list(mean.shape)} and {list(std.shape)}"
        if tuple(mean.shape) != shape or tuple(std.shape) != shape:
            raise InputError(f"input statistics must have shape {list(shape)}, got {got}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise InputError("input statistics must be finite with std > 0")
        self.input_mean.copy_(mean)
        self.input_std.copy_(std)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input ``[B, C, Z, Y, X]`` -> embedded tokens ``[B, prefix + N, D]`` before the blocks."""
        size = self.config.image_size
        if x.ndim != 5 or tuple(x.shape[1:]) != (self.config.in_channels, size, size, size):
            raise InputError(
                f"expected input [B, {self.config.in_channels}, {size}, {size}, {size}], got {list(x.shape)}"
            )
        if self.config.input_norm == "standardise":
            x = (x - self.input_mean.view(1, -1, 1, 1, 1)) / self.input_std.view(1, -1, 1, 1, 1)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, N, D]
        patches = patches + self.pos_embed
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(x.shape[0], -1, -1))
        return torch.cat([*prefix, patches], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, Z, Y, X]`` -> final-normed tokens ``[B, prefix + N, D]``."""
        t = self.tokens(x)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, Z, Y, X]`` -> CLS ``[B, D]`` (not normalised; see :meth:`embed`)."""
        return self.forward_features(x)[:, 0]

    @torch.no_grad()
    def embed(self, x: torch.Tensor, *, return_patches: bool = False):
        """L2-normalised CLS ``[B, D]``; with ``return_patches`` also patch tokens ``[B, N, D]``."""
        feats = self.forward_features(x)
        cls = F.normalize(feats[:, 0], dim=-1)
        if return_patches:
            return cls, feats[:, self.num_prefix_tokens :]
        return cls

    @torch.no_grad()
    def embed_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`embed` (the same numbers) and the last block's CLS -> patch attention averaged over heads
        ``[B, N]`` (as :func:`hctembed.explain.cls_attention`), in one pass: only the CLS row is added."""
        t = self.tokens(x)
        for block in self.blocks[:-1]:
            t = block(t)
        last = self.blocks[-1]
        cls_row = last.attn.first_row(last.norm1(t))[:, :, self.num_prefix_tokens :].mean(dim=1)
        t = last(t)
        return F.normalize(self.norm(t)[:, 0], dim=-1), cls_row

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax attention of every block, each ``[B, H, T, T]`` (T = prefix + N)."""
        t = self.tokens(x)
        maps = []
        for block in self.blocks:
            t, attn = block(t, return_attention=True)
            maps.append(attn)
        return maps
