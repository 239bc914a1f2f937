"""Per-iteration schedules (one value per optimiser step): learning rate, weight decay, EMA momentum,
teacher temperature. Arrays are built once from the planned length of the run, so a run stopped early
(``--max-steps``) and resumed follows exactly the same values as one that was not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(*, base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0):
    """``[total_steps]``: linear ``warmup_start -> base`` over ``warmup_steps``, then a half cosine ``base -> final``.

    Step ``i`` after the warm-up (``i = 0 .. n-1``) takes ``final + (base - final) * (1 + cos(pi * i / n)) / 2``.
    """
    if total_steps < 1:
        raise ValueError("total_steps must be >= 1")
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    warm = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    n = total_steps - warmup_steps
    i = np.arange(n)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate([warm, cos]).astype(np.float64)


def linear_then_constant(*, start: float, end: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """``[total_steps]``: linear ``start -> end`` over ``warmup_steps`` (end reached at the last warm-up step),
    then ``end``. The teacher-temperature warm-up of DINO; a warm-up longer than the run is cut where the run ends
    (as DINO indexes its per-epoch ramp), not squeezed into it."""
    warmup_steps = max(warmup_steps, 0)
    out = np.full(max(total_steps, warmup_steps), end, dtype=np.float64)
    if warmup_steps:
        out[:warmup_steps] = np.linspace(start, end, warmup_steps)
    return out[:total_steps]


@dataclass(frozen=True)
class Schedules:
    """Values per optimiser step ``[total_steps]`` each; ``momentum`` and ``teacher_temp`` only for DINO."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray | None = None
    teacher_temp: np.ndarray | None = None

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def at(self, step: int) -> dict[str, float]:
        out = {"lr": float(self.lr[step]), "wd": float(self.weight_decay[step])}
        if self.momentum is not None:
            out["momentum"] = float(self.momentum[step])
        if self.teacher_temp is not None:
            out["teacher_temp"] = float(self.teacher_temp[step])
        return out


def build_schedules(
    *,
    method: str,
    total_steps: int,
    peak_lr: float,
    min_lr: float,
    warmup_steps: int,
    weight_decay: float,
    momentum_teacher: float = 0.996,
    warmup_teacher_temp: float = 0.04,
    teacher_temp: float = 0.07,
    teacher_temp_warmup_steps: int = 0,
) -> Schedules:
    """The schedules of one run: cosine lr with linear warm-up, constant weight decay (the paper's 0.05),
    and for DINO the cosine EMA momentum ``momentum_teacher -> 1`` and the teacher-temperature warm-up."""
    lr = cosine_schedule(base=peak_lr, final=min_lr, total_steps=total_steps, warmup_steps=warmup_steps)
    wd = np.full(total_steps, weight_decay, dtype=np.float64)
    if method != "dino":
        return Schedules(lr=lr, weight_decay=wd)
    momentum = cosine_schedule(base=momentum_teacher, final=1.0, total_steps=total_steps)
    temp = linear_then_constant(
        start=warmup_teacher_temp, end=teacher_temp, total_steps=total_steps, warmup_steps=teacher_temp_warmup_steps
    )
    return Schedules(lr=lr, weight_decay=wd, momentum=momentum, teacher_temp=temp)
