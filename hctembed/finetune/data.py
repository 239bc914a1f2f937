"""Model inputs for fine-tuning from the per-scan preprocessing cache (the pretraining base volumes: the paper
chain stopped at the 224 mm pad/crop), so that epochs never decode a scan again.

The evaluation input is the paper's: the centre 192 mm of the 224 mm base, resized to the model's edge. While
training, the 192 mm crop is shifted by a random fraction of its margin and flipped left-right; each sample's
randomness comes from (seed, epoch, position), so a resumed run draws the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hctembed.augment import input_from_base, sample_generator
from hctembed.eval.classification import balanced_indices
from hctembed.pretrain.cache import read_base


def epoch_sample(y: np.ndarray, *, n: int, seed: int, epoch: int) -> np.ndarray:
    """One epoch's class-balanced sample of positions into ``y [N, T]`` (drawn with replacement): balanced on the
    task for one task, on "any task positive" for several. A function of (seed, epoch) only."""
    rng = np.random.default_rng([seed, epoch, 7919])
    target = y[:, 0] if y.shape[1] == 1 else np.nanmax(np.nan_to_num(y, nan=0.0), axis=1)
    return balanced_indices(np.nan_to_num(target, nan=0.0), n=n, rng=rng)


class LabelledInputs(Dataset):
    """``(x [C, s, s, s], y [T])`` for the positions ``order`` (each a (sample position, scan index) pair)."""

    def __init__(
        self, paths: Sequence[Path], y: np.ndarray, *, order: Sequence[tuple[int, int]], image_size: int,
        seed: int, epoch: int, train: bool, jitter: float = 0.25, flip_p: float = 0.5,
    ) -> None:  # fmt: skip
        self.paths = list(paths)
        self.y = torch.as_tensor(y, dtype=torch.float32)
        self.order = list(order)
        self.image_size, self.seed, self.epoch, self.train = image_size, seed, epoch, train
        self.jitter, self.flip_p = jitter, flip_p

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        position, index = self.order[k]
        g = sample_generator(seed=self.seed, epoch=self.epoch, index=position) if self.train else None
        x = input_from_base(
            read_base(self.paths[index]), image_size=self.image_size, g=g, jitter=self.jitter, flip_p=self.flip_p
        )
        return x, self.y[index]
