"""Preprocessed base volumes cached on disk, and the pretraining dataset that cuts views from them.

Each scan is decoded, resampled and windowed once (``augment.base_preprocess``) and stored as a uint8
``.npy`` (windows in [0, 1] quantised to 1/255) named by the scan id, a digest of its source file (path,
size, mtime) and the preprocessing fingerprint; later epochs and later runs read that file instead.
Files are written atomically (temporary name, then rename), so concurrent ranks and interrupted runs
never see half a file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from hctembed.augment import (
    MaeCropConfig,
    MultiCropConfig,
    PairViewConfig,
    mae_crop,
    multi_crop,
    pair_views,
    sample_generator,
)
from hctembed.config import PreprocessConfig
from hctembed.io.archive import SeriesRef, load_series
from hctembed.preprocessing import preprocess
from hctembed.volume import VolumeError

log = logging.getLogger(__name__)


def cache_path(ref: SeriesRef, *, folder: Path, config: PreprocessConfig) -> Path:
    source = hashlib.sha256(f"{ref.root}|{ref.source}|{ref.size}|{ref.mtime_ns}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", ref.scan_id)
    return folder / f"{safe}-{source}-{config.fingerprint()}.npy"


def load_or_build(ref: SeriesRef, *, folder: Path, config: PreprocessConfig) -> Path:
    """Path of the cached base volume of ``ref`` (built now if missing). Raises VolumeError for a bad scan."""
    path = cache_path(ref, folder=folder, config=config)
    if path.exists():
        return path
    x = preprocess(load_series(ref), config=config)  # [C, S, S, S] in [0, 1]
    q = torch.round(x.clamp(0, 1) * 255).to(torch.uint8).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, q)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class CachedScan:
    scan_id: str
    path: Path


def build_cache(
    refs: Sequence[SeriesRef], *, folder: Path, config: PreprocessConfig, shard: tuple[int, int] = (0, 1)
) -> tuple[list[CachedScan], list[tuple[str, str]]]:
    """Make sure every scan has a cached base volume. Returns (usable scans in ``refs`` order, failures).

    With ``shard=(rank, world)`` this process builds only every ``world``-th missing file; the caller
    synchronises the ranks and calls again with ``(0, 1)`` to collect every file.
    """
    rank, world = shard
    scans, failed = [], []
    for i, ref in enumerate(refs):
        path = cache_path(ref, folder=folder, config=config)
        if not path.exists() and i % world != rank:
            continue
        try:
            scans.append(CachedScan(ref.scan_id, load_or_build(ref, folder=folder, config=config)))
        except VolumeError as exc:
            failed.append((ref.source, str(exc)))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # one unreadable scan never stops a pretraining run
            failed.append((ref.source, f"{type(exc).__name__}: {exc}"))
    return scans, failed


def read_base(path: Path) -> torch.Tensor:
    """A cached base volume as float32 ``[C, S, S, S]`` in [0, 1]."""
    return torch.from_numpy(np.load(path).astype(np.float32) / 255.0)


class ViewDataset(Dataset):
    """Item ``k`` of an epoch's ordered sample list -> the views of that scan.

    DINO: a list of ``n_global + n_local`` tensors ``[C, s, s, s]``; SimCLR: a list of 2; MAE: one tensor. The
    views are drawn from :func:`augment.sample_generator` (seed, epoch, position in the epoch's order), so they are
    the same whichever process, rank or worker draws them, and on a resumed run.
    """

    def __init__(
        self,
        scans: Sequence[CachedScan],
        *,
        order: Sequence[tuple[int, int]],
        method: str,
        seed: int,
        epoch: int,
        multi_crop_config: MultiCropConfig,
        mae_config: MaeCropConfig,
        pair_config: PairViewConfig,
    ) -> None:
        self.scans = list(scans)
        self.order = list(order)  # (global position in the epoch, scan index)
        self.method = method
        self.seed = seed
        self.epoch = epoch
        self.multi_crop_config = multi_crop_config
        self.mae_config = mae_config
        self.pair_config = pair_config

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        position, scan_index = self.order[k]
        base = read_base(self.scans[scan_index].path)
        g = sample_generator(seed=self.seed, epoch=self.epoch, index=position)
        if self.method == "dino":
            return multi_crop(base, config=self.multi_crop_config, g=g)
        if self.method == "simclr":
            return pair_views(base, config=self.pair_config, g=g)
        return mae_crop(base, config=self.mae_config, g=g)


def collate_views(items: list):
    """DINO and SimCLR: list of V tensors ``[B, C, s, s, s]`` (view-major); MAE: ``[B, C, s, s, s]``."""
    if isinstance(items[0], list):
        return [torch.stack([item[v] for item in items]) for v in range(len(items[0]))]
    return torch.stack(items)


def epoch_order(*, n_scans: int, seed: int, epoch: int, rank: int, world: int, per_rank: int) -> list[tuple[int, int]]:
    """This rank's ``per_rank`` samples of an epoch as (global position, scan index).

    The epoch's permutation comes from (seed, epoch); rank r takes positions r, r + world, ... so that the
    ranks' micro-batches together are exactly the consecutive micro-batches of a single process with a
    ``world`` times larger batch (when ``per_rank`` is a multiple of the per-rank batch).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n_scans)
    return [(p, int(perm[p])) for p in range(rank, world * per_rank, world)]
