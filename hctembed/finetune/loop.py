"""The fine-tuning loop: AdamW with a learning rate for the backbone and one for the classification layer, a
cosine schedule over the planned epochs, masked cross-entropy (unknown labels count for nothing), a class-
balanced sample per epoch, checkpoints with exact resume, and a validation AUC per epoch in ``log.jsonl``.

A step is one optimiser update on ``batch_size`` scans. The sample of each epoch comes from (seed, epoch) and
each input's augmentation from (seed, epoch, position), so a run resumed from a checkpoint ends with the same
weights as one that was not interrupted (on CPU, bit for bit).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from hctembed import distributed as ddp
from hctembed.finetune.classifier import HEAD_PARTS, Classifier, build_classifier
from hctembed.finetune.data import LabelledInputs, epoch_sample
from hctembed.finetune.settings import RESUME_FREE, FinetuneConfig, FinetuneError
from hctembed.pictures.training_curves import plot_training_curves
from hctembed.pretrain.schedules import cosine_schedule
from hctembed.pretrain.state import capture_rng, load_checkpoint, restore_rng, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


@dataclass(frozen=True)
class FinetuneResult:
    classifier: Classifier
    init: dict[str, Any]  # how the backbone was initialised (scratch seed, or the weight file and its digest)
    steps_done: int
    total_steps: int
    samples_per_epoch: int
    last: dict[str, Any]


def _param_groups(model: Classifier, config: FinetuneConfig) -> list[dict[str, Any]]:
    """Backbone and head at their own learning rates; weight decay on matrices only."""
    groups = []
    head = [(p, config.lr_head) for p in HEAD_PARTS if getattr(model, p) is not None]
    parts = [("backbone", config.lr_backbone), *head]
    for part, lr in parts:  # (norm has no parameters)
        decay, no_decay = [], []
        for name, p in getattr(model, part).named_parameters():
            (no_decay if p.ndim <= 1 or name.endswith(("cls_token", "register_tokens")) else decay).append(p)
        groups.append({"params": decay, "part": part, "peak_lr": lr, "weight_decay": config.weight_decay})
        groups.append({"params": no_decay, "part": part, "peak_lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the known labels: ``logits [B, T, 2]``, ``y [B, T]`` with NaN for unknown."""
    known = ~torch.isnan(y)
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], y[known].long())


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_classifier(
    *,
    paths: Sequence[Path],
    y: np.ndarray,
    train: np.ndarray,
    config: FinetuneConfig,
    weights: Path | None = None,
    val: np.ndarray | None = None,
    out: Path | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
) -> FinetuneResult:
    """Fine-tune on the scans ``paths[train]`` (cached base volumes) with labels ``y [N, T]`` (NaN unknown).

    ``weights``: the encoder to start from (strict load), or None for scratch. With ``out``: checkpoints, exact
    resume, and ``log.jsonl`` (loss and learning rates per step, validation AUC per epoch when ``val`` is given).
    """
    dev = _device(device)
    rank, world = ddp.rank_world()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    y = np.asarray(y, dtype=np.float32).reshape(len(paths), -1)
    train = np.asarray(train)
    model, init = build_classifier(model=config.model, weights=weights, n_tasks=y.shape[1], seed=config.seed,
                                   pool=config.pool, head_norm=config.head_norm)  # fmt: skip
    model = model.to(dev).train()
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr_head, betas=config.betas)
    per_epoch = config.epoch_samples(train.size)
    step_batch = config.batch_size * world  # one step: batch_size scans on each of the world's processes
    steps_per_epoch = max(1, per_epoch // step_batch)
    total = config.epochs * steps_per_epoch
    unit = cosine_schedule(
        base=1.0, final=0.0, total_steps=total, warmup_steps=round(config.warmup_fraction * total)
    )  # scaled by each group's peak lr
    stop = min(total, config.max_steps) if config.max_steps is not None else total
    step = _resume(out, model, optimizer, config=config, train=train, init=init) if resume and out else 0
    log_file = _open_log(out, step=step) if out is not None and rank == 0 else None
    trainable = model
    if world > 1:
        trainable = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    image_size = model.backbone.config.image_size
    last: dict[str, Any] = {}
    batches, started = None, time.perf_counter()
    try:
        while step < stop:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if batches is None or in_epoch == 0:
                sample = train[epoch_sample(y[train], n=steps_per_epoch * step_batch, seed=config.seed,
                                            epoch=epoch)]  # fmt: skip
                # this process's share: sample positions rank, rank + world, ... (the union over the processes of
                # one step is the step's consecutive positions, as in one process with the whole step batch)
                order = list(enumerate(sample.tolist()))[in_epoch * step_batch + rank :: world]
                dataset = LabelledInputs(paths, y, order=order, image_size=image_size, seed=config.seed, epoch=epoch,
                                         train=True, jitter=config.jitter, flip_p=config.flip_p)  # fmt: skip
                loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers)
                batches = iter(loader)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * float(unit[step])
            x, yb = next(batches)
            loss = masked_cross_entropy(trainable(x.to(dev, non_blocking=True)), yb.to(dev))
            if not torch.isfinite(loss):
                raise FinetuneError(f"loss is {float(loss)} at step {step}: lower the learning rate")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            factor = float(unit[step - 1])
            last = {"step": step, "epoch": epoch, "loss": float(ddp.all_reduce_mean(loss.detach())),
                    "lr_backbone": config.lr_backbone * factor, "lr_head": config.lr_head * factor}  # fmt: skip
            end_of_epoch = step % steps_per_epoch == 0 or step == stop
            if end_of_epoch and val is not None and val.size and rank == 0:
                last["val_auc"] = validation_auc(model, paths, y, val, device=dev)
                model.train()
            if log_file is not None and (step % config.log_every == 0 or end_of_epoch):
                last["seconds"] = round(time.perf_counter() - started, 3)
                log_file.write(json.dumps(last) + "\n")
                log_file.flush()
            if end_of_epoch and rank == 0:
                log.info("step %d/%d epoch %d loss %.4f%s", step, total, epoch, last["loss"],
                         f" val AUC {last['val_auc']}" if "val_auc" in last else "")  # fmt: skip
            if out is not None and rank == 0 and (step % config.checkpoint_every == 0 or step == stop):
                _checkpoint(out, model, optimizer, config=config, step=step, train=train, init=init)
                plot_training_curves(out / LOG_FILE, out / "curves.png", title=f"fine-tuning from {init['init']}")
    finally:
        if log_file is not None:
            log_file.close()
    ddp.barrier()  # rank 0's checkpoint and log are complete
    return FinetuneResult(model.eval(), init, step, total, per_epoch, last)


@torch.no_grad()
def predict(
    model: Classifier, paths: Sequence[Path], *, batch_size: int = 8, device: str | torch.device | None = None
) -> np.ndarray:
    """Positive-class probabilities ``[len(paths), T]`` on the evaluation input (centre crop, no flips)."""
    dev = next(model.parameters()).device if device is None else _device(device)
    was_training = model.training
    model.eval()
    dataset = LabelledInputs(paths, np.zeros((len(paths), model.n_tasks), np.float32),
                             order=list(enumerate(range(len(paths)))), image_size=model.backbone.config.image_size,
                             seed=0, epoch=0, train=False)  # fmt: skip
    out = [model.positive_probability(x.to(dev)).cpu() for x, _ in DataLoader(dataset, batch_size=batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, model.n_tasks))


def validation_auc(model: Classifier, paths, y: np.ndarray, val: np.ndarray, *, device) -> float | None:
    """Mean AUC over the tasks that have both classes in the validation scans (None when none has)."""
    from hctembed.eval.classification import roc_auc

    scores = predict(model, [paths[i] for i in val], device=device)
    aucs = []
    for t in range(y.shape[1]):
        yt = y[val, t]
        keep = ~np.isnan(yt)
        if keep.any() and 0 < yt[keep].sum() < keep.sum():
            aucs.append(roc_auc(yt[keep], scores[keep, t]))
    return round(float(np.mean(aucs)), 4) if aucs else None


def _open_log(out: Path, *, step: int):
    """``log.jsonl`` for appending: a fresh run starts it empty; a resumed one keeps the rows up to its checkpoint
    (rows logged after the checkpoint are logged again as the steps are redone)."""
    path = out / LOG_FILE
    kept = []
    if step and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
    path.write_text("".join(f"{line}\n" for line in kept))
    return path.open("a")


def _same_init(saved: dict, now: dict) -> bool:
    """The same initial weights: equal digests for a weight file (wherever it lies now), equal seeds for scratch."""
    keys = ("init", "weights_digest") if now.get("init") == "weights" else ("init", "seed", "model")
    return all(saved.get(k) == now.get(k) for k in keys)


def _digest(train: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(train, dtype=np.int64).tobytes()).hexdigest()[:16]


def _checkpoint(out: Path, model, optimizer, *, config, step, train, init) -> None:
    state = {
        "format": "hctembed-finetune",
        "config": config.to_json(),
        "init": json.dumps(init),
        "train": _digest(train),
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng(),
    }
    save_checkpoint(out / CHECKPOINT_FILE, state)


def _resume(out: Path, model, optimizer, *, config, train, init) -> int:
    path = out / CHECKPOINT_FILE
    if not path.exists():
        log.info("no checkpoint in %s: starting from the beginning", out)
        return 0
    state = load_checkpoint(path)
    if state.get("format") != "hctembed-finetune":
        raise FinetuneError(f"{path} is not a fine-tuning checkpoint")
    saved, now = json.loads(state["config"]), json.loads(config.to_json())
    diff = sorted(k for k in now if k not in RESUME_FREE and saved.get(k) != now[k])
    if diff:
        raise FinetuneError(f"cannot resume: the checkpoint was made with other settings ({', '.join(diff)})")
    if state["train"] != _digest(train) or not _same_init(json.loads(state["init"]), init):
        raise FinetuneError("cannot resume: the training scans or the initial weights differ from the checkpoint's")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"])
    log.info("resumed from %s at step %d", path, int(state["step"]))
    return int(state["step"])
