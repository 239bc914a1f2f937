"""One training loop for DINO and MAE: schedules, accumulation, AMP on CUDA, DDP, checkpoints, exact resume.

A *step* is one optimiser update (``accumulate`` micro-batches of ``batch_size`` scans per process). The
schedules are built from the planned run (``epochs``), so ``max_steps`` only stops early and a resumed run
follows the same values. Every view comes from a generator seeded by (seed, epoch, sample position), the
MAE masks from a per-rank generator whose state is checkpointed, and the data order from (seed, epoch):
a run interrupted at a checkpoint and resumed ends with the same weights as one that was not (on CPU,
bit for bit). Distributed calls go through :mod:`hctembed.distributed` (no-ops in one process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hctembed import distributed as ddp
from hctembed.augment import MaeCropConfig, MultiCropConfig, base_preprocess
from hctembed.config import VIT_PRESETS
from hctembed.errors import HctembedError
from hctembed.model.encoders import REGISTRY
from hctembed.model.vit3d import ViT3D
from hctembed.pretrain.cache import ViewDataset, build_cache, collate_views, epoch_order
from hctembed.pretrain.dino import (
    DINOHead,
    DINOHeadConfig,
    DINOLoss,
    DINOStudent,
    cancel_last_layer_grads,
    ema_update,
    make_teacher,
)
from hctembed.pretrain.export import export_backbone
from hctembed.pretrain.mae import MAE3D, MAEConfig
from hctembed.pretrain.schedules import build_schedules
from hctembed.pretrain.state import capture_rng, load_checkpoint, restore_rng, save_checkpoint

log = logging.getLogger(__name__)

BASE_LR = {"dino": 3e-4, "mae": 1.5e-3}
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
# settings that may differ between a run and its resumption (they do not change the maths)
RESUME_FREE = ("max_steps", "checkpoint_every", "num_workers", "log_every", "amp")


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
    warmup_epochs: float = 5.0  # DINO; MAE warms up over 5 % of the steps
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
    mae: MAEConfig = field(default_factory=MAEConfig)
    checkpoint_every: int = 100
    seed: int = 0
    amp: bool = True  # bf16 autocast, CUDA only (CPU runs in fp32)
    num_workers: int = 0
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.method not in BASE_LR:
            raise PretrainError(f"unknown method {self.method!r}; use dino or mae")
        if self.model not in VIT_PRESETS:
            raise PretrainError(f"unknown model {self.model!r}; known: {', '.join(VIT_PRESETS)}")
        if min(self.epochs, self.batch_size, self.accumulate, self.checkpoint_every) < 1:
            raise PretrainError("epochs, batch size, accumulate and checkpoint interval must be >= 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class PretrainResult:
    out: Path
    encoder_path: Path | None
    steps_done: int
    total_steps: int
    data_count: int
    failed: list[tuple[str, str]]
    last: dict[str, Any]
    backbone: ViT3D  # the exported network (DINO: the teacher's backbone; MAE: the encoder)
    trained: torch.nn.Module  # the module trained by gradients (DINO student / MAE), unwrapped


def _param_groups(module: torch.nn.Module) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on biases, norms, tokens, or the fixed weight-norm gain)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "register_tokens", "mask_token")) else decay).append(p)
    return [{"params": decay, "regularized": True}, {"params": no_decay, "regularized": False}]


class _Models:
    """The trainable module (student or MAE), the DINO teacher and loss, and the backbone to export."""

    def __init__(self, config: PretrainConfig, *, device: torch.device) -> None:
        vit = VIT_PRESETS[config.model]
        backbone = ViT3D(vit)
        self.teacher = self.loss = None
        if config.method == "dino":
            head = DINOHead(
                vit.dim,
                DINOHeadConfig(
                    out_dim=config.prototypes, hidden_dim=config.head_hidden, bottleneck_dim=config.bottleneck
                ),
            )
            self.module: torch.nn.Module = DINOStudent(backbone, head).to(device)
            self.teacher = make_teacher(self.module)
            self.loss = DINOLoss(out_dim=config.prototypes, n_global=2).to(device)
        else:
            self.module = MAE3D(backbone, config.mae).to(device)

    def export_backbone(self) -> ViT3D:
        if self.teacher is not None:
            return self.teacher.backbone
        return self.module.encoder


def _plan(config: PretrainConfig, *, n_scans: int, world: int) -> tuple[int, int]:
    """(steps per epoch, micro-batches per epoch) for this data count and world size."""
    micro = (n_scans // world) // config.batch_size
    steps = micro // config.accumulate
    if steps < 1:
        raise PretrainError(
            f"{n_scans} usable scans are too few for {world} process(es) x batch {config.batch_size} "
            f"x accumulate {config.accumulate}"
        )
    return steps, steps * config.accumulate


def run_pretrain(
    *,
    refs,
    config: PretrainConfig,
    out: Path,
    resume: bool = False,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
) -> PretrainResult:
    """Pretrain on the scans ``refs`` (SeriesRefs); writes checkpoints, ``log.jsonl`` and the encoder to ``out``."""
    device = torch.device(device)
    rank, world = ddp.rank_world()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vit = VIT_PRESETS[config.model]
    base_cfg = base_preprocess(image_size=vit.image_size)
    cache_dir = Path(cache_dir) if cache_dir else out / "cache"
    build_cache(refs, folder=cache_dir, config=base_cfg, shard=(rank, world))
    ddp.barrier()
    scans, failed = build_cache(refs, folder=cache_dir, config=base_cfg)
    for source, reason in failed:
        log.warning("skipped %s: %s", source, reason)
    steps_per_epoch, micro_per_epoch = _plan(config, n_scans=len(scans), world=world)
    total_steps = config.epochs * steps_per_epoch
    eff_batch = config.batch_size * config.accumulate * world
    peak_lr = config.lr if config.lr is not None else BASE_LR[config.method] * eff_batch / 256
    warmup = (
        min(round(config.warmup_epochs * steps_per_epoch), total_steps // 10)
        if config.method == "dino"
        else round(0.05 * total_steps)
    )
    sched = build_schedules(
        method=config.method,
        total_steps=total_steps,
        peak_lr=peak_lr,
        min_lr=min(config.min_lr, peak_lr),
        warmup_steps=warmup,
        weight_decay=config.weight_decay,
        momentum_teacher=config.momentum_teacher,
        warmup_teacher_temp=config.warmup_teacher_temp,
        teacher_temp=config.teacher_temp,
        teacher_temp_warmup_steps=min(
            round(config.teacher_temp_warmup_epochs * steps_per_epoch), (3 * total_steps) // 10
        ),
    )
    # identical initial weights on every rank; per-rank streams for MAE masks
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002 (the global state some libraries use; checkpointed)
    random.seed(config.seed)
    models = _Models(config, device=device)
    optimizer = torch.optim.AdamW(_param_groups(models.module), lr=peak_lr, betas=config.betas)
    mask_gen = torch.Generator().manual_seed(config.seed * 1000 + rank)
    scan_ids = [s.scan_id for s in scans]
    card = {
        "method": config.method,
        "model": config.model,
        "data_count": len(scans),
        "epochs": config.epochs,
        "total_steps": total_steps,
        "effective_batch": eff_batch,
        "fingerprint": REGISTRY[config.model].preprocess.fingerprint(),
        "preprocess": "paper",
        "pretrain_fingerprint": base_cfg.fingerprint(),
        "source": "hctembed pretrain",
        "exported_from": "teacher" if config.method == "dino" else "encoder",
    }
    ckpt_path = out / CHECKPOINT_FILE
    step = 0
    if resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        _check_resumable(state, config=config, scan_ids=scan_ids, world=world)
        models.module.load_state_dict(state["student"])
        if models.teacher is not None:
            models.teacher.load_state_dict(state["teacher"])
            models.loss.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"][rank], mask_gen=mask_gen)
        step = int(state["step"])
        log.info("resumed from %s at step %d of %d", ckpt_path, step, total_steps)
    elif resume:
        log.info("no checkpoint in %s: starting from scratch", out)
    trainable = models.module
    if world > 1:
        trainable = DistributedDataParallel(models.module, device_ids=[device.index] if device.type == "cuda" else None)
    stop = min(total_steps, config.max_steps) if config.max_steps is not None else total_steps
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if device.type == "cuda" and config.amp
        else contextlib.nullcontext
    )
    mc = MultiCropConfig(out_size=vit.image_size, n_local=config.local_crops)
    mae_crop_cfg = MaeCropConfig(out_size=vit.image_size)
    log_file = (out / LOG_FILE).open("a") if rank == 0 else None
    last: dict[str, Any] = {}
    batches = None
    started = time.perf_counter()
    try:
        while step < stop:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if batches is None or in_epoch == 0:
                order = epoch_order(
                    n_scans=len(scans),
                    seed=config.seed,
                    epoch=epoch,
                    rank=rank,
                    world=world,
                    per_rank=micro_per_epoch * config.batch_size,
                )
                dataset = ViewDataset(
                    scans,
                    order=order[in_epoch * config.accumulate * config.batch_size :],
                    method=config.method,
                    seed=config.seed,
                    epoch=epoch,
                    multi_crop_config=mc,
                    mae_config=mae_crop_cfg,
                )
                batches = iter(
                    DataLoader(
                        dataset,
                        batch_size=config.batch_size,
                        num_workers=config.num_workers,
                        collate_fn=collate_views,
                        shuffle=False,
                    )
                )
            values = sched.at(step)
            for group in optimizer.param_groups:
                group["lr"] = values["lr"]
                group["weight_decay"] = values["wd"] if group["regularized"] else 0.0
            loss_sum = torch.zeros((), device=device)
            centre_sum = None
            for micro in range(config.accumulate):
                batch = next(batches)
                sync = micro == config.accumulate - 1 or world == 1
                with contextlib.nullcontext() if sync else trainable.no_sync(), autocast():
                    if config.method == "dino":
                        views = [v.to(device, non_blocking=True) for v in batch]
                        with torch.no_grad():
                            t_out = models.teacher(torch.cat(views[:2]))
                        s_out = trainable(torch.cat(views))
                        loss = models.loss(s_out, t_out, teacher_temp=values["teacher_temp"])
                        c = DINOLoss.batch_center(t_out)
                        centre_sum = c if centre_sum is None else centre_sum + c
                    else:
                        loss, _, _ = trainable(batch.to(device, non_blocking=True), generator=mask_gen)
                    (loss / config.accumulate).backward()
                loss_sum += loss.detach().float()
            if not torch.isfinite(loss_sum):
                raise PretrainError(f"loss is {float(loss_sum)} at step {step}: lower the learning rate")
            if config.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(models.module.parameters(), config.clip_grad)
            if config.method == "dino" and epoch < config.freeze_last_layer_epochs:
                cancel_last_layer_grads(models.module.head)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if config.method == "dino":
                ema_update(teacher=models.teacher, student=models.module, momentum=values["momentum"])
                models.loss.update_center(ddp.all_reduce_mean(centre_sum / config.accumulate))
            step += 1
            mean_loss = float(ddp.all_reduce_mean(loss_sum / config.accumulate))
            last = {"step": step, "epoch": epoch, "loss": mean_loss, **values}
            if rank == 0 and (step % config.log_every == 0 or step == stop):
                last["seconds"] = round(time.perf_counter() - started, 3)
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
                temp = f" temp {values['teacher_temp']:.4f}" if "teacher_temp" in values else ""
                log.info(
                    "step %d/%d epoch %d loss %.5f lr %.3g%s", step, total_steps, epoch, mean_loss, values["lr"], temp
                )
            if step % config.checkpoint_every == 0 or step == stop:
                _checkpoint(ckpt_path, config, models, optimizer, mask_gen, step, scan_ids, card, world, rank)
    finally:
        if log_file is not None:
            log_file.close()
    encoder_path = None
    if rank == 0:
        done = dict(card, steps=step, epochs_completed=round(step / steps_per_epoch, 4))
        encoder_path = export_backbone(models.export_backbone(), out, card=done)
    ddp.barrier()
    return PretrainResult(
        out, encoder_path, step, total_steps, len(scans), failed, last, models.export_backbone(), models.module
    )


def _checkpoint(path, config, models, optimizer, mask_gen, step, scan_ids, card, world, rank) -> None:
    rng = ddp.all_gather_objects(capture_rng(mask_gen=mask_gen))
    if rank != 0:
        return
    state = {
        "format": "hctembed-pretrain",
        "config": config.to_json(),
        "vit": json.dumps(VIT_PRESETS[config.model].to_dict()),
        "card": json.dumps(card),
        "step": step,
        "world": world,
        "scan_ids": scan_ids,
        "student": models.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng,
    }
    if models.teacher is not None:
        state["teacher"] = models.teacher.state_dict()
        state["loss"] = models.loss.state_dict()  # the DINO centre
    save_checkpoint(path, state)


def _check_resumable(state: dict, *, config: PretrainConfig, scan_ids: list[str], world: int) -> None:
    saved = json.loads(state["config"])
    now = json.loads(config.to_json())
    diff = sorted(k for k in now if k not in RESUME_FREE and saved.get(k) != now[k])
    if diff:
        raise PretrainError(f"cannot resume: the checkpoint was made with other settings ({', '.join(diff)})")
    if state["scan_ids"] != scan_ids:
        raise PretrainError("cannot resume: the usable scans differ from the checkpoint's")
    if int(state["world"]) != world:
        raise PretrainError(f"cannot resume exactly: checkpoint from {state['world']} process(es), now {world}")
