"""One training loop for every pretraining method: schedules, accumulation, AMP on CUDA, DDP, checkpoints, exact
resume. What differs between DINO, MAE and SimCLR lives in :mod:`hctembed.pretrain.methods`; this loop has no
branch on the method.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hctembed import distributed as ddp
from hctembed.augment import MaeCropConfig, base_preprocess
from hctembed.config import VIT_PRESETS
from hctembed.model.encoders import REGISTRY, with_input_norm
from hctembed.model.vit3d import ViT3D
from hctembed.pictures.training_curves import plot_training_curves
from hctembed.pretrain.cache import ViewDataset, build_cache, collate_views, epoch_order, read_base
from hctembed.pretrain.export import export_backbone
from hctembed.pretrain.methods import Method, build_method, method_class
from hctembed.pretrain.monitors import LabelMonitor, collapse_warning
from hctembed.pretrain.settings import RESUME_FREE, PretrainConfig, PretrainError
from hctembed.pretrain.state import capture_rng, load_checkpoint, restore_rng, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
CURVES_FILE = "curves.png"
__all__ = ["PretrainConfig", "PretrainError", "PretrainResult", "run_pretrain"]


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


def clip_gradients(module: torch.nn.Module, *, max_norm: float, mode: str) -> None:
    """Clip the gradients of ``module``: ``global`` as ``clip_grad_norm_`` (all together), ``per-parameter`` each
    parameter's gradient to norm ``max_norm`` on its own (DINO's ``clip_gradients``)."""
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
        return
    for p in module.parameters():
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


@torch.no_grad()
def fit_input_stats(scans, *, image_size: int, limit: int = 256) -> dict[str, torch.Tensor]:
    """Per-channel mean and std ``[C]`` of the embedding-time input (the centre crop of each cached base volume,
    resized) over the first ``limit`` training scans: what a standardising encoder subtracts and divides by."""
    from hctembed.augment import input_from_base

    total = sq = None
    count = 0
    for scan in scans[:limit]:
        x = input_from_base(read_base(scan.path), image_size=image_size).double()  # [C, S, S, S]
        flat = x.flatten(1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        sq = (flat**2).sum(1) if sq is None else sq + (flat**2).sum(1)
        count += flat.shape[1]
    mean = total / count
    std = (sq / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-3)
    return {"mean": mean.float(), "std": std.float()}


def set_input_stats(method: Method, *, mean: torch.Tensor, std: torch.Tensor) -> None:
    """The statistics on every encoder of ``method`` (the student and, for DINO, the teacher)."""
    for net in (method.module, getattr(method, "teacher", None)):
        for m in net.modules() if net is not None else ():
            if isinstance(m, ViT3D):
                m.set_input_stats(mean=mean, std=std)


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


@dataclass
class _Run:
    """What the steps share: the method, optimiser, data plan, and where the run writes."""

    config: PretrainConfig
    method: Method
    optimizer: torch.optim.Optimizer
    scans: list
    steps_per_epoch: int
    micro_per_epoch: int
    total_steps: int
    device: torch.device
    rank: int
    world: int
    card: dict[str, Any]
    out: Path
    monitor: LabelMonitor | None = None


def _card(config: PretrainConfig, *, method: Method, n_scans: int, total_steps: int, eff_batch: int, peak_lr: float,
          base_cfg):  # fmt: skip
    return {
        "method": config.method,
        "model": config.model,
        "data_count": n_scans,
        "epochs": config.epochs,
        "total_steps": total_steps,
        "effective_batch": eff_batch,
        "peak_lr": peak_lr,
        "fingerprint": with_input_norm(REGISTRY[config.model].preprocess.fingerprint(), method.backbone()),
        "input_norm": config.input_norm,
        "drop_path": config.drop_path,
        "clip_grad": config.clip_grad,
        "clip_mode": config.clip_mode,
        "preprocess": "paper",
        "pretrain_fingerprint": base_cfg.fingerprint(),
        "source": "hctembed pretrain",
        "exported_from": method.exported_from,
        **method.card_settings(),
    }


def run_pretrain(
    *,
    refs,
    config: PretrainConfig,
    out: Path,
    resume: bool = False,
    device: torch.device | str = "cpu",
    cache_dir: Path | None = None,
    monitor_labels=None,
    recipe: dict | None = None,
) -> PretrainResult:
    """Pretrain on the scans ``refs`` (SeriesRefs); writes checkpoints, ``log.jsonl``, ``curves.png`` and the
    encoder to ``out``. ``monitor_labels`` (a LabelTable): every ``config.monitor_every`` steps, kNN AUC and
    retrieval mAP of the current backbone on labelled cached scans are logged (never trained on)."""
    method_cls = method_class(config.method)  # an unknown method fails before any work
    device = torch.device(device)
    rank, world = ddp.rank_world()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = base_preprocess(image_size=VIT_PRESETS[config.model].image_size)
    cache_dir = Path(cache_dir) if cache_dir else out / "cache"
    build_cache(refs, folder=cache_dir, config=base_cfg, shard=(rank, world))
    ddp.barrier()
    scans, failed = build_cache(refs, folder=cache_dir, config=base_cfg)
    for source, reason in failed:
        log.warning("skipped %s: %s", source, reason)
    steps_per_epoch, micro_per_epoch = _plan(config, n_scans=len(scans), world=world)
    total_steps = config.epochs * steps_per_epoch
    eff_batch = config.batch_size * config.accumulate * world
    peak_lr = config.lr if config.lr is not None else method_cls.base_lr * eff_batch / 256
    # identical initial weights on every rank; per-rank streams for MAE masks
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)  # noqa: NPY002 (the global state some libraries use; checkpointed)
    random.seed(config.seed)
    method = build_method(config, device=device, generator=torch.Generator().manual_seed(config.seed * 1000 + rank))
    run = _Run(
        config=config,
        method=method,
        optimizer=torch.optim.AdamW(_param_groups(method.module), lr=peak_lr, betas=config.betas),
        scans=scans,
        steps_per_epoch=steps_per_epoch,
        micro_per_epoch=micro_per_epoch,
        total_steps=total_steps,
        device=device,
        rank=rank,
        world=world,
        card=_card(config, method=method, n_scans=len(scans), total_steps=total_steps, eff_batch=eff_batch,
                   peak_lr=peak_lr, base_cfg=base_cfg),
        out=out,
        monitor=LabelMonitor.of(scans, monitor_labels, every=config.monitor_every) if monitor_labels else None,
    )  # fmt: skip
    sched = method.schedules(steps_per_epoch=steps_per_epoch, total_steps=total_steps, peak_lr=peak_lr)
    if recipe is not None:
        run.card["recipe"] = recipe
    step = _resume(run) if resume else 0
    if config.input_norm == "standardise":
        if step == 0:  # a resumed run has them from its checkpoint
            set_input_stats(method, **fit_input_stats(scans, image_size=VIT_PRESETS[config.model].image_size))
        net = method.backbone()
        run.card["input_stats"] = {"mean": net.input_mean.tolist(), "std": net.input_std.tolist()}
    step, last = _train(run, sched, start=step)
    encoder_path = None
    if rank == 0:
        done = dict(run.card, steps=step, epochs_completed=round(step / steps_per_epoch, 4))
        encoder_path = export_backbone(method.backbone(), out, card=done)
    ddp.barrier()
    backbone = method.backbone()
    return PretrainResult(out, encoder_path, step, total_steps, len(scans), failed, last, backbone, method.module)


def _resume(run: _Run) -> int:
    """The step to continue from: the checkpoint's (its state restored), or 0 when there is none."""
    path = run.out / CHECKPOINT_FILE
    if not path.exists():
        log.info("no checkpoint in %s: starting from scratch", run.out)
        return 0
    state = load_checkpoint(path)
    _check_resumable(state, config=run.config, scan_ids=[s.scan_id for s in run.scans], world=run.world)
    run.method.load_state(state)
    run.optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"][run.rank], mask_gen=run.method.generator)
    step = int(state["step"])
    log.info("resumed from %s at step %d of %d", path, step, run.total_steps)
    return step


def _batches(run: _Run, *, epoch: int, in_epoch: int):
    """This rank's micro-batches of ``epoch`` from micro-batch ``in_epoch * accumulate`` on."""
    c = run.config
    order = epoch_order(
        n_scans=len(run.scans), seed=c.seed, epoch=epoch, rank=run.rank, world=run.world,
        per_rank=run.micro_per_epoch * c.batch_size,
    )  # fmt: skip
    image_size = VIT_PRESETS[c.model].image_size
    dataset = ViewDataset(
        run.scans,
        order=order[in_epoch * c.accumulate * c.batch_size :],
        method=c.method,
        seed=c.seed,
        epoch=epoch,
        multi_crop_config=c.multi_crop(),
        mae_config=MaeCropConfig(out_size=image_size),
        pair_config=c.pair_views(),
    )
    loader = DataLoader(
        dataset, batch_size=c.batch_size, num_workers=c.num_workers, collate_fn=collate_views, shuffle=False
    )
    return iter(loader)


def _train(run: _Run, sched, *, start: int) -> tuple[int, dict[str, Any]]:
    """Steps from ``start`` to the end (or ``max_steps``); returns the last step and its logged values."""
    c, method, optimizer, device = run.config, run.method, run.optimizer, run.device
    trainable = method.module
    if run.world > 1:
        trainable = DistributedDataParallel(method.module, device_ids=[device.index] if device.type == "cuda" else None)
    stop = min(run.total_steps, c.max_steps) if c.max_steps is not None else run.total_steps
    use_amp = device.type == "cuda" and c.amp
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    log_file = (run.out / LOG_FILE).open("a") if run.rank == 0 else None
    step, last, batches, started, warned = start, {}, None, time.perf_counter(), set()
    try:
        while step < stop:
            epoch, in_epoch = divmod(step, run.steps_per_epoch)
            if batches is None or in_epoch == 0:
                batches = _batches(run, epoch=epoch, in_epoch=in_epoch)
            values = sched.at(step)
            for group in optimizer.param_groups:
                group["lr"] = values["lr"]
                group["weight_decay"] = values["wd"] if group["regularized"] else 0.0
            loss_sum = torch.zeros((), device=device)
            for micro in range(c.accumulate):
                batch = next(batches)
                sync = micro == c.accumulate - 1 or run.world == 1
                with contextlib.nullcontext() if sync else trainable.no_sync(), autocast():
                    loss = method.loss(batch, trainable=trainable, values=values)
                    (loss / c.accumulate).backward()
                loss_sum += loss.detach().float()
            if not torch.isfinite(loss_sum):
                raise PretrainError(f"loss is {float(loss_sum)} at step {step}: lower the learning rate")
            if c.clip_grad > 0:
                clip_gradients(method.module, max_norm=c.clip_grad, mode=c.clip_mode)
            method.before_optimizer_step(epoch=epoch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            method.after_optimizer_step(values=values)
            step += 1
            mean_loss = float(ddp.all_reduce_mean(loss_sum / c.accumulate))
            last = {"step": step, "epoch": epoch, "loss": mean_loss, **values}
            last |= _monitor(run, values, step=step, warned=warned)
            if run.rank == 0 and (step % c.log_every == 0 or step == stop):
                last["seconds"] = round(time.perf_counter() - started, 3)
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
                temp = f" temp {values['teacher_temp']:.4f}" if "teacher_temp" in values else ""
                log.info("step %d/%d epoch %d loss %.5f lr %.3g%s", step, run.total_steps, epoch, mean_loss,
                         values["lr"], temp)  # fmt: skip
            if step % c.checkpoint_every == 0 or step == stop:
                _checkpoint(run, step)
                if run.rank == 0:
                    plot_training_curves(run.out / LOG_FILE, run.out / CURVES_FILE, title=f"{c.method} {c.model}")
    finally:
        if log_file is not None:
            log_file.close()
    return step, last


def _monitor(run: _Run, values: dict[str, Any], *, step: int, warned: set[str]) -> dict[str, Any]:
    """The method's per-step numbers, the labelled monitor when due, and a collapse warning (once per kind, after
    the first tenth of the run)."""
    stats = run.method.monitor_stats()
    due = run.rank == 0 and (step % run.config.monitor_every == 0 or step == 1)
    if due and run.monitor is not None:
        stats |= run.monitor(run.method.backbone(), device=run.device)
    if due:  # the method's picture of one fixed scan (MAE: its reconstruction)
        run.method.draw_monitor(read_base(run.scans[0].path), out=run.out, step=step)
    found = collapse_warning(stats, dim=VIT_PRESETS[run.config.model].dim) if step > run.total_steps // 10 else None
    if found and found[0] not in warned and run.rank == 0:
        warned.add(found[0])
        log.warning("step %d: collapse? %s", step, found[1])
        stats["warning"] = found[1]
    return stats


def _checkpoint(run: _Run, step: int) -> None:
    rng = ddp.all_gather_objects(capture_rng(mask_gen=run.method.generator))
    if run.rank != 0:
        return
    state = {
        "format": "hctembed-pretrain",
        "config": run.config.to_json(),
        "vit": json.dumps(run.config.vit().to_dict()),
        "card": json.dumps(run.card),
        "step": step,
        "world": run.world,
        "scan_ids": [s.scan_id for s in run.scans],
        **run.method.state(),
        "optimizer": run.optimizer.state_dict(),
        "rng": rng,
    }
    save_checkpoint(run.out / CHECKPOINT_FILE, state)


def _check_resumable(state: dict, *, config: PretrainConfig, scan_ids: list[str], world: int) -> None:
    saved = json.loads(state["config"])
    now = json.loads(config.to_json())
    # a setting added after the checkpoint was written had its default value then (also inside nested settings)
    defaults = json.loads(PretrainConfig(model=config.model).to_json())

    def then(key: str):
        value = saved.get(key, defaults[key])
        return {**defaults[key], **value} if isinstance(value, dict) else value

    diff = sorted(k for k in now if k not in RESUME_FREE and then(k) != now[k])
    if diff:
        raise PretrainError(f"cannot resume: the checkpoint was made with other settings ({', '.join(diff)})")
    if state["scan_ids"] != scan_ids:
        raise PretrainError("cannot resume: the usable scans differ from the checkpoint's")
    if int(state["world"]) != world:
        raise PretrainError(f"cannot resume exactly: checkpoint from {state['world']} process(es), now {world}")
