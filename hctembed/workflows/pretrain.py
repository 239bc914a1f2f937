"""Pretrain an encoder on an archive: find its scans, join the process group torchrun set up (if any), and run
the method's loop (:func:`hctembed.pretrain.run_pretrain`). ``hctembed pretrain`` is this plus printing."""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

from hctembed.pretrain import PretrainConfig, PretrainError, PretrainResult

log = logging.getLogger(__name__)


def pretrain_archive(
    archive: Path,
    *,
    config: PretrainConfig,
    out: Path,
    resume: bool = False,
    cache_dir: Path | None = None,
    device: str | None = None,
    monitor_labels: Path | None = None,
    scan_ids: Collection[str] | None = None,
    recipe: dict | None = None,
) -> PretrainResult | None:
    """Run ``config`` on the archive's scans (a folder, a file or a manifest); rank 0 returns the result, the
    other ranks of a torchrun job ``None``. ``device``: cpu or cuda (default: cuda when torch sees one).
    ``monitor_labels``: a labels CSV for the kNN / retrieval monitor (see :mod:`hctembed.pretrain.monitors`).
    ``scan_ids``: pretrain on these of the archive's scans only (e.g. the training part of a patient split, so
    that held-out patients stay unseen); an id the archive lacks is an error. ``recipe``: the recipe's name and
    each value's source (:mod:`hctembed.pretrain.recipes`), written into the model card."""
    import torch

    from hctembed import distributed as ddp
    from hctembed.io.sources import FindOptions, open_source
    from hctembed.pretrain import run_pretrain

    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise PretrainError("--device cuda but no CUDA device is available")
    from hctembed.io.labels import read_labels
    from hctembed.pretrain.methods import method_class

    method_class(config.method)  # an unknown method fails before the archive is read
    labels = read_labels(monitor_labels) if monitor_labels else None
    found = open_source(archive).find(FindOptions())
    refs = found.selected
    if scan_ids is not None:
        wanted = set(scan_ids)
        missing = wanted - {r.scan_id for r in refs}
        if missing:
            raise PretrainError(f"{len(missing)} of the requested scans are not usable in {archive}, e.g. "
                                f"{sorted(missing)[0]!r}")  # fmt: skip
        refs = [r for r in refs if r.scan_id in wanted]
    if not refs:
        raise PretrainError(f"no usable scans in {archive}")
    dev = ddp.init_from_env(use_cuda=use_cuda)
    rank, world = ddp.rank_world()
    try:
        if rank == 0:
            log.info(
                "%d scans in %s; %s on %s, %d process(es) on %s",
                len(refs), archive, config.method, config.model, world, dev.type,
            )  # fmt: skip
        result = run_pretrain(refs=refs, config=config, out=out, resume=resume, device=dev, cache_dir=cache_dir,
                              monitor_labels=labels, recipe=recipe)  # fmt: skip
    finally:
        ddp.shutdown()
    return result if rank == 0 else None
