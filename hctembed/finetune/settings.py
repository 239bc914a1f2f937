"""Fine-tuning settings. Defaults are the paper's (Methods, "Evaluation"): AdamW, cosine schedule, lr 1e-5 for
the backbone and 1e-3 for the classification layer, cross-entropy, at most 10 epochs, a class-balanced sample
of the training part drawn each epoch (5,000 scans, or 500 for small sets)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from hctembed.config import VIT_PRESETS
from hctembed.errors import HctembedError

LARGE_SET = 5000  # training parts at least this big get 5,000 samples per epoch, smaller ones 500
# settings that may differ between a run and its resumption (they do not change the maths)
RESUME_FREE = ("max_steps", "checkpoint_every", "num_workers", "log_every")


class FinetuneError(HctembedError):
    """A fine-tuning run that cannot start or resume; the message says why."""


@dataclass(frozen=True)
class FinetuneConfig:
    model: str = "vit-base"  # architecture of a scratch run (a weight file brings its own)
    epochs: int = 10
    max_steps: int | None = None  # stop early (the schedule still spans ``epochs``)
    batch_size: int = 8
    lr_backbone: float = 1e-5
    lr_head: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_fraction: float = 0.0  # of the steps, linear; the paper names only the cosine schedule
    samples_per_epoch: int | None = None  # None: 5,000, or 500 when the training part is under 5,000 scans
    jitter: float = 0.25  # random shift of the 192 mm crop, as a fraction of the margin to the 224 mm base
    flip_p: float = 0.5  # left-right flips while training
    pool: str = "cls"  # cls, mean (patch tokens) or attentive (a learned query over the patch tokens)
    head_norm: bool = True  # standardise the pooled features over the batch before the linear layer
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.model not in VIT_PRESETS:
            raise FinetuneError(f"unknown model {self.model!r}; known: {', '.join(VIT_PRESETS)}")
        if min(self.epochs, self.batch_size, self.checkpoint_every, self.log_every) < 1:
            raise FinetuneError("epochs, batch size, checkpoint and log intervals must be >= 1")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 2:
            raise FinetuneError("--samples-per-epoch must be >= 2")
        if self.pool not in ("cls", "mean", "attentive"):
            raise FinetuneError(f"pool must be cls, mean or attentive, not {self.pool!r}")
        if self.lr_backbone < 0 or self.lr_head <= 0:
            raise FinetuneError("learning rates must be positive (backbone may be 0: a frozen backbone)")

    def epoch_samples(self, n_train: int) -> int:
        if self.samples_per_epoch is not None:
            return self.samples_per_epoch
        return 5000 if n_train >= LARGE_SET else 500

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
