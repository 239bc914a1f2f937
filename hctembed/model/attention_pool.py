"""Attention pooling: one learned query attends over a set of tokens (the attentive probe's pooling, and the
fine-tuning head's ``--pool attentive``). A finding that fills a few of hundreds of patches is weighed by where
it is, not averaged away as the mean patch token or a CLS token that attends evenly averages it."""

from __future__ import annotations

import torch
from torch import nn


def attend(query: torch.Tensor, attn: nn.MultiheadAttention, tokens: torch.Tensor) -> torch.Tensor:
    """``query [1, 1, D]`` attends over ``tokens [B, N, D]`` through ``attn`` -> ``[B, D]``."""
    pooled, _ = attn(query.expand(tokens.shape[0], -1, -1), tokens, tokens, need_weights=False)
    return pooled[:, 0]


class AttentionPool(nn.Module):
    """``tokens [B, N, D] -> [B, D]``: a learned query (``heads`` attention heads) over the tokens."""

    def __init__(self, dim: int, *, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return attend(self.query, self.attn, tokens)
