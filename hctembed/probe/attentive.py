"""Attentive probe (FM-HCT 'Fine tuning and probing'): one learned query attends over an encoder's patch
tokens; the attended vector goes through a LayerNorm and a linear layer to two logits.

Training follows the paper's probing recipe: AdamW, cosine learning-rate schedule, cross-entropy, at most
10 epochs, learning rate 1e-3 for the classification layers, and each epoch a class-balanced sample
(half positives, half negatives, drawn with replacement) of ``samples_per_epoch`` scans.
Saved as safetensors (config in the metadata) and loaded strictly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save
from torch import nn

from hctembed.errors import HctembedError, InputError
from hctembed.eval.classification import balanced_indices
from hctembed.model.attention_pool import attend
from hctembed.model.checkpoint import load_state_strict

FORMAT = "hctembed-attentive-probe"


class ProbeError(HctembedError, ValueError):
    """A probe file or probe input that cannot be used; the message says why."""


@dataclass(frozen=True)
class AttentiveConfig:
    dim: int
    heads: int = 4
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.05
    samples_per_epoch: int = 500
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise InputError(f"token dim {self.dim} is not divisible by heads {self.heads}")


class AttentiveProbe(nn.Module):
    """``tokens [B, N, D]`` -> logits ``[B, 2]`` (class 1 = positive)."""

    def __init__(self, config: AttentiveConfig) -> None:
        super().__init__()
        self.config = config
        self.query = nn.Parameter(torch.zeros(1, 1, config.dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn = nn.MultiheadAttention(config.dim, config.heads, batch_first=True)
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(attend(self.query, self.attn, tokens)))


def train_attentive(tokens: np.ndarray, y: np.ndarray, *, config: AttentiveConfig) -> AttentiveProbe:
    """Train on ``tokens [N, T, D]`` float and binary ``y [N]``; deterministic for a given seed."""
    tokens_t = torch.as_tensor(np.asarray(tokens), dtype=torch.float32)
    if tokens_t.ndim != 3 or tokens_t.shape[2] != config.dim:
        raise ProbeError(f"attentive probe takes tokens [N, T, {config.dim}], got {tuple(tokens_t.shape)}")
    y = (np.asarray(y) > 0.5).astype(np.int64)
    rng = np.random.default_rng(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        probe = AttentiveProbe(config)
    steps_per_epoch = math.ceil(config.samples_per_epoch / config.batch_size)
    opt = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    labels = torch.as_tensor(y)
    probe.train()
    for _ in range(config.epochs):
        idx = balanced_indices(y, n=config.samples_per_epoch, rng=rng)
        for start in range(0, idx.size, config.batch_size):
            batch = torch.as_tensor(idx[start : start + config.batch_size])
            loss = nn.functional.cross_entropy(probe(tokens_t[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return probe.eval()


@torch.inference_mode()
def attentive_scores(probe: AttentiveProbe, tokens: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """P(positive) ``[N]`` for ``tokens [N, T, D]``."""
    tokens_t = torch.as_tensor(np.asarray(tokens), dtype=torch.float32)
    out = [
        torch.softmax(probe(tokens_t[i : i + batch_size]), dim=1)[:, 1] for i in range(0, tokens_t.shape[0], batch_size)
    ]
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def attentive_fit_score(*, config_kw: dict | None = None):
    """A ``FitScore`` for :mod:`hctembed.eval.protocols`: train on token features, score the test tokens."""

    def fit_score(train_x, train_y, test_x):
        config = AttentiveConfig(dim=int(train_x.shape[2]), **(config_kw or {}))
        return attentive_scores(train_attentive(train_x, train_y, config=config), test_x)

    return fit_score


def save_attentive(probe: AttentiveProbe, path: str | Path, *, meta: dict) -> None:
    """Write the probe's tensors, its config and ``meta`` (model id, task, ...) to a safetensors file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in probe.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(asdict(probe.config)), "meta": json.dumps(meta)}
    path.write_bytes(save(tensors, metadata=metadata))


def load_attentive(path: str | Path) -> tuple[AttentiveProbe, dict]:
    """Load a probe written by :func:`save_attentive`, strictly. Returns (probe, meta)."""
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"probe file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise ProbeError(f"{path} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT:
        raise ProbeError(f"{path} is not an attentive probe (format {metadata.get('format')!r})")
    if "config" not in metadata:
        raise ProbeError(f"{path}: no probe configuration in its metadata")
    probe = AttentiveProbe(AttentiveConfig(**json.loads(metadata["config"])))
    load_state_strict(probe, load_file(str(path)))
    return probe.eval(), json.loads(metadata.get("meta", "{}"))
