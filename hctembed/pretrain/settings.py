"""The settings of a pretraining run (defaults: the paper's) and its error type."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from hctembed.augment import MultiCropConfig, PairViewConfig
from hctembed.config import VIT_PRESETS
from hctembed.errors import HctembedError
from hctembed.pretrain.mae import MAEConfig

# settings that may differ between a run and its resumption (they do not change the maths)
CENTERINGS = ("ema", "sinkhorn")
RESUME_FREE = ("max_steps", "checkpoint_every", "num_workers", "log_every", "amp", "monitor_every")


class PretrainError(HctembedError):
    """A pretraining run that cannot start or resume (too few scans, a mismatched checkpoint, ...)."""


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of a run (defaults: the paper's). ``lr`` None -> base lr x effective batch / 256."""

    method: str = "dino"
    model: str = "vit-base"
    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 2  # per process and micro-batch
    accumulate: int = 1
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0  # DINO and SimCLR; MAE warms up over 5 % of the steps
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: float = 30.0
    local_crops: int = 3
    prototypes: int = 65536
    head_hidden: int = 2048
    bottleneck: int = 256
    head_bn: bool = False  # DINO head: BatchNorm in its hidden layers (see DINOHead)
    intensity_jitter: bool = True  # DINO views: the paper's intensity shift and contrast change
    centering: str = "ema"  # DINO teacher targets: "ema" (running centre, DINO's) or "sinkhorn" (DINOv2's)
    koleo: float = 0.0  # DINO: weight of DINOv2's KoLeo term on the student's global CLS vectors (0: off)
    mae: MAEConfig = field(default_factory=MAEConfig)
    temperature: float = 0.1  # SimCLR: the NT-Xent temperature
    checkpoint_every: int = 100
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only (CPU runs in fp32)
    num_workers: int = 0
    log_every: int = 1
    monitor_every: int = 50  # steps between labelled-monitor evaluations (with monitor labels)

    def __post_init__(self) -> None:
        if self.model not in VIT_PRESETS:
            raise PretrainError(f"unknown model {self.model!r}; known: {', '.join(VIT_PRESETS)}")
        if min(self.epochs, self.batch_size, self.accumulate, self.checkpoint_every, self.monitor_every) < 1:
            raise PretrainError("epochs, batch size, accumulate, checkpoint and monitor intervals must be >= 1")
        if self.centering not in CENTERINGS:
            raise PretrainError(f"unknown centering {self.centering!r}; use {' or '.join(CENTERINGS)}")
        if not self.koleo >= 0.0:
            raise PretrainError(f"koleo weight must be >= 0, got {self.koleo}")
        if self.koleo > 0 and self.batch_size < 2:
            raise PretrainError("--koleo needs a batch of at least 2 scans per process (the nearest other vector)")
        if self.method != "dino" and (self.centering != "ema" or self.koleo > 0):
            raise PretrainError(f"--centering and --koleo are DINO settings; {self.method} has no teacher")
        if not self.temperature > 0:
            raise PretrainError(f"temperature must be > 0, got {self.temperature}")
        if self.method == "simclr" and self.batch_size < 2:
            raise PretrainError("simclr needs a batch of at least 2 scans per process (the other scans are negatives)")

    def multi_crop(self) -> MultiCropConfig:
        """DINO's views at the model input size: ``local_crops`` local crops; without ``intensity_jitter`` no
        intensity shift or contrast change (CT numbers are calibrated: blood stays blood)."""
        out = VIT_PRESETS[self.model].image_size
        if self.intensity_jitter:
            return MultiCropConfig(out_size=out, n_local=self.local_crops)
        return MultiCropConfig(out_size=out, n_local=self.local_crops, shift=0.0, contrast=(1.0, 1.0))

    def pair_views(self) -> PairViewConfig:
        """SimCLR's views at the model input size."""
        return PairViewConfig(out_size=VIT_PRESETS[self.model].image_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
