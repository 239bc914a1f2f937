"""The settings of a pretraining run (defaults: the paper's) and its error type."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from hctembed.augment import MultiCropConfig, PairViewConfig
from hctembed.config import INPUT_NORMS, VIT_PRESETS, ViTConfig
from hctembed.errors import HctembedError, InputError
from hctembed.pretrain.mae import MAEConfig

# settings that may differ between a run and its resumption (they do not change the maths)
CENTERINGS = ("ema", "sinkhorn")
CLIP_MODES = ("global", "per-parameter")
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
    # "per-parameter": each parameter's gradient norm clipped to clip_grad on its own (DINO's clip_gradients);
    # "global": the norm of all gradients together (torch's clip_grad_norm_)
    clip_mode: str = "global"
    input_norm: str = "none"  # "standardise": per-channel statistics fitted on the training scans (ViTConfig)
    drop_path: float = 0.0  # stochastic depth rate of the last block (ViTConfig)
    freeze_last_layer_epochs: int = 1
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_epochs: float = 30.0
    # the teacher-temperature warm-up may take at most this share of the run (1.0: exactly the epochs above, as
    # the recipe gives them; a run shorter than the warm-up ends part-way up the ramp)
    teacher_temp_max_share: float = 0.3
    local_crops: int = 3
    prototypes: int = 65536
    head_hidden: int = 2048
    bottleneck: int = 256
    head_bn: bool = False  # DINO head: BatchNorm in its hidden layers (see DINOHead)
    intensity_jitter: bool = True  # DINO views: the paper's intensity shift and contrast change
    # SimCLR views: each view's own intensity shift and contrast change, DINO's ranges (SimCLR's colour jitter)
    pair_intensity_jitter: bool = False
    # SimCLR views: each view its own random cube of this edge range (mm of the 224 mm base) before its deformation
    # (akin to SimCLR's random resized crop); None: both views deform the whole embedding-time input
    pair_crop_mm: tuple[float, float] | None = None
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
        if self.clip_mode not in CLIP_MODES:
            raise PretrainError(f"unknown clip mode {self.clip_mode!r}; use {' or '.join(CLIP_MODES)}")
        if self.input_norm not in INPUT_NORMS:
            raise PretrainError(f"unknown input norm {self.input_norm!r}; use {' or '.join(INPUT_NORMS)}")
        if not 0.0 <= self.drop_path < 1.0:
            raise PretrainError(f"drop path must be in [0, 1), got {self.drop_path}")
        if not 0.0 < self.teacher_temp_max_share <= 1.0:
            raise PretrainError(f"teacher_temp_max_share must be in (0, 1], got {self.teacher_temp_max_share}")
        if self.centering not in CENTERINGS:
            raise PretrainError(f"unknown centering {self.centering!r}; use {' or '.join(CENTERINGS)}")
        if not self.koleo >= 0.0:
            raise PretrainError(f"koleo weight must be >= 0, got {self.koleo}")
        if self.koleo > 0 and self.batch_size < 2:
            raise PretrainError("--koleo needs a batch of at least 2 scans per process (the nearest other vector)")
        if self.pair_intensity_jitter and self.method != "simclr":
            raise PretrainError(f"--pair-intensity-jitter is a SimCLR setting; {self.method} has no pair views")
        if self.pair_crop_mm is not None:
            if self.method != "simclr":
                raise PretrainError(f"--pair-crop-mm is a SimCLR setting; {self.method} has no pair views")
            try:
                self.pair_views()  # the views' own check of the range, named by the option that set it
            except InputError as error:
                raise PretrainError(f"--pair-crop-mm: {error}") from None
        if self.method != "dino" and (self.centering != "ema" or self.koleo > 0):
            raise PretrainError(f"--centering and --koleo are DINO settings; {self.method} has no teacher")
        if not self.temperature > 0:
            raise PretrainError(f"temperature must be > 0, got {self.temperature}")
        if self.method == "simclr" and self.batch_size < 2:
            raise PretrainError("simclr needs a batch of at least 2 scans per process (the other scans are negatives)")

    def vit(self) -> ViTConfig:
        """The encoder this run trains: the ``model`` preset with this run's input norm and drop path."""
        return replace(VIT_PRESETS[self.model], input_norm=self.input_norm, drop_path=self.drop_path)

    def multi_crop(self) -> MultiCropConfig:
        """DINO's views at the model input size: ``local_crops`` local crops; without ``intensity_jitter`` no
        intensity shift or contrast change (CT numbers are calibrated: blood stays blood)."""
        out = VIT_PRESETS[self.model].image_size
        if self.intensity_jitter:
            return MultiCropConfig(out_size=out, n_local=self.local_crops)
        return MultiCropConfig(out_size=out, n_local=self.local_crops, shift=0.0, contrast=(1.0, 1.0))

    def pair_views(self) -> PairViewConfig:
        """SimCLR's views at the model input size; with ``pair_intensity_jitter`` DINO's intensity shift and contrast
        ranges, drawn per view; with ``pair_crop_mm`` each view cut from its own random cube of the base."""
        out = VIT_PRESETS[self.model].image_size
        crop = None if self.pair_crop_mm is None else tuple(self.pair_crop_mm)
        if not self.pair_intensity_jitter:
            return PairViewConfig(out_size=out, crop_mm=crop)
        dino = MultiCropConfig(out_size=out)
        return PairViewConfig(out_size=out, intensity_shift=dino.shift, contrast=dino.contrast, crop_mm=crop)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
