"""Patch tokens for the attentive probe. They are not stored in DuckDB: they are recomputed by running the
stored encoder (same weights, checked by model id) on the scan files, or read from a file of precomputed
tokens (``.npz`` with arrays ``scan_ids [N]`` and ``tokens [N, T, D]``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from hctembed.index.store import Collection
from hctembed.probe.attentive import ProbeError

log = logging.getLogger(__name__)


def read_tokens_file(path: str | Path, scan_ids: Sequence[str]) -> np.ndarray:
    """``tokens [len(scan_ids), T, D]`` in the given order from an ``.npz`` (``scan_ids``, ``tokens``)."""
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"tokens file not found: {path}")
    if path.suffix != ".npz":
        raise ProbeError(f"{path}: tokens must be an .npz with arrays 'scan_ids' and 'tokens'")
    with np.load(path, allow_pickle=False) as f:
        if {"scan_ids", "tokens"} - set(f.files):
            raise ProbeError(f"{path}: needs arrays 'scan_ids' and 'tokens', has {f.files}")
        ids = [str(s) for s in f["scan_ids"]]
        tokens = f["tokens"]
    if tokens.ndim != 3 or tokens.shape[0] != len(ids):
        raise ProbeError(f"{path}: tokens of shape {tokens.shape} for {len(ids)} scan ids (want [N, T, D])")
    row = {s: i for i, s in enumerate(ids)}
    missing = [s for s in scan_ids if s not in row]
    if missing:
        raise ProbeError(f"{path} has no tokens for {len(missing)} scans, e.g. {missing[:3]}")
    return np.ascontiguousarray(tokens[[row[s] for s in scan_ids]], dtype=np.float32)


def compute_tokens(
    collection: Collection,
    scan_ids: Sequence[str],
    *,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Patch tokens ``[len(scan_ids), N, D]`` (after the final norm) of the collection's encoder on each scan's
    file, preprocessed as at embedding time."""
    from hctembed.errors import InputError
    from hctembed.io.archive import load_volume
    from hctembed.model.encoders import rebuild_encoder
    from hctembed.preprocessing import preprocess

    info = collection.model()
    try:
        encoder = rebuild_encoder(
            name=info.name, model_id=collection.model_id, weights_path=info.weights_path, card=info.card
        )
    except InputError as exc:
        raise ProbeError(f"{exc}; pass precomputed tokens with --tokens") from None
    if encoder.fingerprint != collection.fingerprint:
        raise ProbeError(f"encoder preprocessing {encoder.fingerprint} != stored {collection.fingerprint}")
    if not hasattr(encoder.model, "embed"):
        raise ProbeError(f"model {encoder.name} exposes no patch tokens; pass precomputed tokens with --tokens")
    ids, _, stored_ids = collection.vectors()
    by_scan = dict(zip(stored_ids, ids.tolist(), strict=True))
    missing = [s for s in scan_ids if s not in by_scan]
    if missing:
        raise ProbeError(f"{len(missing)} scans have no vector for {collection.model_id}, e.g. {missing[:3]}")
    rows = collection.hits([by_scan[s] for s in scan_ids])
    out = []
    for s in scan_ids:
        path = rows[by_scan[s]].path
        if path is None or not Path(path).exists():
            raise ProbeError(f"scan {s}: its file ({path}) is not available; pass precomputed tokens with --tokens")
        x = preprocess(load_volume(path), config=encoder.preprocess)
        with torch.inference_mode():
            _, patches = encoder.model.embed(x[None], return_patches=True)
        out.append(patches[0].float().numpy())
        if progress:
            progress(1)
    return np.stack(out) if out else np.zeros((0, 0, collection.dim), np.float32)
