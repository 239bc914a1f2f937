"""Guarded torch.distributed helpers: each one is a no-op (or the identity) in a single process.

The training loop and sharded embedding call only these, so the core maths (``dino.py``, ``mae.py``) never
touches torch.distributed or CUDA. :func:`init_from_env` reads the variables torchrun sets and is called by the
CLI, not by library code.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over ranks (in place); ``t`` itself in a single process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (in place); ``t`` itself in a single process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank; ``[obj]`` in a single process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_from_env(*, use_cuda: bool, backend: str | None = None, timeout: timedelta | None = None) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_*``):
    nccl with one GPU per process on CUDA, gloo on CPU (or ``backend``). ``timeout`` bounds how long a
    collective (a barrier) waits for the slowest rank. Returns this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not active():
        dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), timeout=timeout)
        log.info("rank %d of %d (%s)", dist.get_rank(), world, dist.get_backend())
    return device


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
