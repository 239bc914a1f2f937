"""Self-supervised methods as objects the training loop drives without knowing which one it runs.

A method builds its modules, computes the loss of one micro-batch, acts around the optimiser step (DINO: freeze
the last layer early, EMA teacher, centre update), saves and restores its state, and names the backbone to
export. A new method plugs in by subclassing :class:`Method` and adding itself to :data:`METHODS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from hctembed import distributed as ddp
from hctembed.model.vit3d import ViT3D
from hctembed.pretrain.dino import (
    DINOHead,
    DINOHeadConfig,
    DINOLoss,
    DINOStudent,
    cancel_last_layer_grads,
    ema_update,
    koleo_loss,
    make_teacher,
    sinkhorn_knopp,
)
from hctembed.pretrain.mae import MAE3D
from hctembed.pretrain.monitors import dino_stats, embedding_spread
from hctembed.pretrain.schedules import Schedules, build_schedules
from hctembed.pretrain.settings import PretrainConfig, PretrainError
from hctembed.pretrain.simclr import ContrastiveModel, nt_xent


class Method:
    """The part of a pretraining run that differs between methods; the loop calls these in order per step:
    ``loss`` for each micro-batch, ``before_optimizer_step``, the optimiser step, ``after_optimizer_step``."""

    name: ClassVar[str]
    base_lr: ClassVar[float]  # peak lr for an effective batch of 256 (scaled linearly)
    exported_from: ClassVar[str]  # which network becomes the encoder (for the model card)

    def __init__(self, config: PretrainConfig, *, device: torch.device, generator: torch.Generator) -> None:
        self.config = config
        self.device = device
        self.generator = generator  # per-rank random stream (MAE masks); checkpointed by the loop
        self.module: nn.Module = nn.Identity()  # trained by gradients

    def warmup_steps(self, *, steps_per_epoch: int, total_steps: int) -> int:
        """Linear lr warm-up: ``warmup_epochs`` epochs, at most a tenth of the run (DINO's; MAE overrides it)."""
        return min(round(self.config.warmup_epochs * steps_per_epoch), total_steps // 10)

    def schedules(self, *, steps_per_epoch: int, total_steps: int, peak_lr: float) -> Schedules:
        """Per-step values (lr, weight decay, and whatever the method reads in ``values``)."""
        c = self.config
        temp_warmup = round(c.teacher_temp_warmup_epochs * steps_per_epoch)
        if c.teacher_temp_max_share < 1.0:  # squeezed into a share of a short run (1.0: the epochs as given)
            temp_warmup = min(temp_warmup, int(c.teacher_temp_max_share * total_steps + 1e-9))
        return build_schedules(
            method=self.name,
            total_steps=total_steps,
            peak_lr=peak_lr,
            min_lr=min(c.min_lr, peak_lr),
            warmup_steps=self.warmup_steps(steps_per_epoch=steps_per_epoch, total_steps=total_steps),
            weight_decay=c.weight_decay,
            momentum_teacher=c.momentum_teacher,
            warmup_teacher_temp=c.warmup_teacher_temp,
            teacher_temp=c.teacher_temp,
            teacher_temp_warmup_steps=temp_warmup,
        )

    def loss(self, batch: Any, *, trainable: nn.Module, values: dict[str, float]) -> torch.Tensor:
        """The loss of one micro-batch; ``trainable`` is ``module`` or its DDP wrapper (use it for the forward)."""
        raise NotImplementedError

    def before_optimizer_step(self, *, epoch: int) -> None:
        """After the gradients of every micro-batch are in, before the optimiser uses them."""

    def after_optimizer_step(self, *, values: dict[str, float]) -> None:
        """After the optimiser step (EMA updates and running statistics)."""

    def monitor_stats(self) -> dict[str, float]:
        """Numbers of the last micro-batch that show learning or collapse (logged with the loss)."""
        return {}

    def card_settings(self) -> dict[str, Any]:
        """The settings that say what this method's loss asked for, for the model card (so that a card tells e.g. a
        histogram MAE from a pixel one)."""
        return {}

    def draw_monitor(self, base: torch.Tensor, *, out: Path, step: int) -> Path | None:
        """A picture of what the method does with one fixed scan (``base``: its cached base volume), or None."""
        return None

    def state(self) -> dict[str, Any]:
        """Tensors to checkpoint (``student``: the trained module, plus any the method keeps)."""
        return {"student": self.module.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["student"])

    def backbone(self) -> ViT3D:
        """The network exported as the encoder."""
        raise NotImplementedError


class DINOMethod(Method):
    """Self-distillation: a student on all crops matches an EMA teacher on the global crops (centred, sharpened)."""

    name = "dino"
    base_lr = 3e-4
    exported_from = "teacher"

    def __init__(self, config: PretrainConfig, *, device: torch.device, generator: torch.Generator) -> None:
        super().__init__(config, device=device, generator=generator)
        vit = config.vit()
        head_config = DINOHeadConfig(
            out_dim=config.prototypes,
            hidden_dim=config.head_hidden,
            bottleneck_dim=config.bottleneck,
            use_bn=config.head_bn,
        )
        self.module = DINOStudent(ViT3D(vit), DINOHead(vit.dim, head_config)).to(device)
        if config.head_bn:
            self.module = _global_batchnorm(self.module, device=device)  # as DINO does
        self.teacher = make_teacher(self.module)
        self.criterion = DINOLoss(out_dim=config.prototypes, n_global=2).to(device)
        self._centre_sum: torch.Tensor | None = None
        self._micro = 0
        self._stats: dict[str, float] = {}

    def loss(self, batch: Any, *, trainable: nn.Module, values: dict[str, float]) -> torch.Tensor:
        views = [v.to(self.device, non_blocking=True) for v in batch]
        with torch.no_grad():
            t_cls = self.teacher.backbone(torch.cat(views[:2]))
            t_out = self.teacher.head(t_cls)
        s_out, s_cls = trainable(torch.cat(views), with_cls=True)
        temp = values["teacher_temp"]
        if self.config.centering == "sinkhorn":
            probs = sinkhorn_knopp(t_out, teacher_temp=temp, all_reduce_sum=ddp.all_reduce_sum)
        else:
            probs = self.criterion.teacher_probs(t_out, teacher_temp=temp)
        loss = self.criterion(s_out, t_out, teacher_temp=temp, teacher_probs=probs)
        koleo = None
        if self.config.koleo > 0:
            # per global view, as DINOv2: spread this batch's student CLS vectors apart
            koleo = sum(koleo_loss(c) for c in s_cls[: t_out.shape[0]].chunk(2))
            loss = loss + self.config.koleo * koleo
        self._stats = dino_stats(
            teacher_probs=probs, student_global=s_out[: t_out.shape[0]].detach(), teacher_cls=t_cls,
            student_temp=self.criterion.student_temp,
        )  # fmt: skip
        if koleo is not None:
            self._stats["koleo"] = round(float(koleo.detach()), 6)
        centre = DINOLoss.batch_center(t_out)
        self._centre_sum = centre if self._centre_sum is None else self._centre_sum + centre
        self._micro += 1
        return loss

    def before_optimizer_step(self, *, epoch: int) -> None:
        if epoch < self.config.freeze_last_layer_epochs:
            cancel_last_layer_grads(self.module.head)

    def after_optimizer_step(self, *, values: dict[str, float]) -> None:
        ema_update(teacher=self.teacher, student=self.module, momentum=values["momentum"])
        self.criterion.update_center(ddp.all_reduce_mean(self._centre_sum / self._micro))  # kept with sinkhorn too
        self._centre_sum, self._micro = None, 0

    def monitor_stats(self) -> dict[str, float]:
        return dict(self._stats)

    def state(self) -> dict[str, Any]:
        # "loss" holds the DINO centre
        return super().state() | {"teacher": self.teacher.state_dict(), "loss": self.criterion.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.teacher.load_state_dict(state["teacher"])
        self.criterion.load_state_dict(state["loss"])

    def card_settings(self) -> dict[str, Any]:
        c = self.config
        return {"centering": c.centering, "koleo": c.koleo, "head_bn": c.head_bn}

    def backbone(self) -> ViT3D:
        return self.teacher.backbone


class MAEMethod(Method):
    """Masked autoencoding: the encoder sees a quarter of the patches, a light decoder predicts the rest (MSE)."""

    name = "mae"
    base_lr = 1.5e-3
    exported_from = "encoder"

    def __init__(self, config: PretrainConfig, *, device: torch.device, generator: torch.Generator) -> None:
        super().__init__(config, device=device, generator=generator)
        self.module = MAE3D(ViT3D(config.vit()), config.mae).to(device)

    def warmup_steps(self, *, steps_per_epoch: int, total_steps: int) -> int:
        return round(0.05 * total_steps)

    def loss(self, batch: Any, *, trainable: nn.Module, values: dict[str, float]) -> torch.Tensor:
        loss, _, _ = trainable(batch.to(self.device, non_blocking=True), generator=self.generator)
        return loss

    def card_settings(self) -> dict[str, Any]:
        mae = self.config.mae
        return {"mae_target": mae.target, "mask_ratio": mae.mask_ratio, "norm_pix_loss": mae.norm_pix_loss}

    def backbone(self) -> ViT3D:
        return self.module.encoder

    def draw_monitor(self, base: torch.Tensor, *, out: Path, step: int) -> Path:
        """``reconstruction.png``: mid slices of a fixed scan, its visible patches, and the reconstruction (the same
        mask every time, so pictures of successive steps compare)."""
        from hctembed.augment import input_from_base
        from hctembed.pictures.reconstruction import plot_reconstruction

        x = input_from_base(base, image_size=self.module.vit.image_size)[None].to(self.device)
        was = self.module.training
        self.module.eval()
        visible, recon = self.module.reconstruct(x, generator=torch.Generator().manual_seed(0))
        self.module.train(was)
        images = [t[0, 0].float().cpu().numpy() for t in (x, visible, recon)]
        return plot_reconstruction(images, out=out / "reconstruction.png", title=f"MAE step {step}")


class SimCLRMethod(Method):
    """Contrastive pairs: two deformed views of the whole head; each view must find its partner in the batch."""

    name = "simclr"
    base_lr = 1e-3
    exported_from = "encoder"

    def __init__(self, config: PretrainConfig, *, device: torch.device, generator: torch.Generator) -> None:
        super().__init__(config, device=device, generator=generator)
        # the projector's batch statistics over every process's pairs, as SimCLR's global BatchNorm
        self.module = _global_batchnorm(ContrastiveModel(ViT3D(config.vit())).to(device), device=device)
        self._stats: dict[str, float] = {}

    def loss(self, batch: Any, *, trainable: nn.Module, values: dict[str, float]) -> torch.Tensor:
        views = torch.cat([v.to(self.device, non_blocking=True) for v in batch])  # [2B, C, s, s, s], view-major
        z, cls = trainable(views)
        loss, hits = nt_xent(z, temperature=self.config.temperature)
        b = cls.shape[0] // 2
        unit = torch.nn.functional.normalize(cls.detach().float(), dim=-1)
        self._stats = {
            "pair_top1": round(float(hits), 6),  # how often a view's nearest other view is its partner
            "pair_cosine": round(float((unit[:b] * unit[b:]).sum(-1).mean()), 6),  # CLS of the two views
            "embedding_std": embedding_spread(cls),
        }
        return loss

    def card_settings(self) -> dict[str, Any]:
        crop = self.config.pair_crop_mm
        return {"temperature": self.config.temperature, "pair_intensity_jitter": self.config.pair_intensity_jitter,
                "pair_crop_mm": None if crop is None else list(crop)}  # fmt: skip

    def monitor_stats(self) -> dict[str, float]:
        return dict(self._stats)

    def backbone(self) -> ViT3D:
        return self.module.backbone


def _global_batchnorm(module: nn.Module, *, device: torch.device) -> nn.Module:
    """``module`` with its BatchNorm statistics over every process's batch under DDP on CUDA (SyncBatchNorm runs on
    CUDA only; CPU processes under gloo normalise over their own share)."""
    if ddp.active() and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


METHODS: dict[str, type[Method]] = {m.name: m for m in (DINOMethod, MAEMethod, SimCLRMethod)}


def method_class(name: str) -> type[Method]:
    """The method called ``name``, or a PretrainError that lists the known ones."""
    if name not in METHODS:
        raise PretrainError(f"unknown method {name!r}; use {', '.join(METHODS)}")
    return METHODS[name]


def build_method(config: PretrainConfig, *, device: torch.device, generator: torch.Generator) -> Method:
    """The method ``config.method`` names, its modules built on ``device``."""
    return method_class(config.method)(config, device=device, generator=generator)
