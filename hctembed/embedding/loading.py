"""Scans into model inputs in DataLoader workers, encoded batch by batch, with every failure kept to its scan.

A scan that cannot be used (unreadable, over ``max_voxels``, out of memory) becomes a failed :class:`Outcome`
with its reason; a worker process that dies costs only the scan that killed it (see :func:`encode_refs`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hctembed.allocator import retain_freed_memory
from hctembed.io.admission import Limits
from hctembed.io.archive import SeriesRef, load_series
from hctembed.model.encoders import Encoder
from hctembed.preprocessing import AnyPreprocessConfig, preprocess
from hctembed.preprocessing.series import SkipError, check_scan, prepare, source_facts
from hctembed.volume import MAX_VOXELS, SourceUnavailable, Volume, VolumeError

log = logging.getLogger(__name__)

NON_FINITE = "the encoder gave a non-finite embedding (NaN or inf) for it"
NOT_UNIT = "the encoder gave an embedding of norm {norm:.3g}, not 1 (zero weights?)"


def usable_vectors(vectors: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """Which rows of ``vectors [n, dim]`` may be stored: finite and of unit norm (every encoder here returns
    L2-normalised vectors; a zero vector, from weights cast to zero say, would match nothing). Returns the mask
    and, per row, why it may not (None where it may)."""
    finite = np.isfinite(vectors).all(axis=1)
    norms = np.linalg.norm(np.where(finite[:, None], vectors, 0.0), axis=1)
    unit = np.abs(norms - 1.0) < 1e-3
    why = [None if ok and u else NON_FINITE if not ok else NOT_UNIT.format(norm=n)
           for ok, u, n in zip(finite, unit, norms, strict=True)]  # fmt: skip
    return finite & unit, why


@dataclass(frozen=True)
class Loading:
    """How scans become model inputs: ``max_voxels`` (a scan whose headers claim more fails, unread),
    ``head_check`` (a scan whose image is not a head is skipped), and ``preprocess_device``: None to preprocess
    in the DataLoader workers (CPU), or a device (``"cuda"``) to have the workers only decode, and resample,
    window and crop there, in the main process (:func:`hctembed.preprocessing.preprocess`)."""

    max_voxels: int = MAX_VOXELS
    head_check: bool = True
    preprocess_device: str | None = None
    zip_limits: Limits | None = None  # member count, inflated size and ratio of the zips read (None: defaults)


@dataclass(frozen=True)
class Prepared:
    """One dataset item: the model input ``x [C, Z, Y, X]``, or (decoding only) the HU volume ``decoded`` to
    preprocess on the device, or the reason neither could be made."""

    position: int
    x: torch.Tensor | None
    reason: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False  # not a failure: the scan is not what the archive is embedded for (not a head)
    decoded: tuple | None = None  # (HU [Z, Y, X] in shared memory, affine, meta, SliceStack or None)


class ScanDataset(Dataset):
    """Map-style dataset over SeriesRefs; never raises for a bad scan (returns its reason instead)."""

    def __init__(self, refs: Sequence[SeriesRef], *, config: AnyPreprocessConfig, loading: Loading = Loading()) -> None:
        self.refs = list(refs)
        self.config = config
        self.loading = loading

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> Prepared:
        ref = self.refs[i]
        try:
            if self.loading.preprocess_device is not None:
                volume = load_series(ref, max_voxels=self.loading.max_voxels, limits=self.loading.zip_limits)
                hu = torch.from_numpy(np.ascontiguousarray(volume.array))  # shared memory across processes
                return Prepared(i, None, None, dict(ref.facts), decoded=(hu, volume.affine, volume.meta, volume.stack))
            x, facts = prepare(
                ref, config=self.config, max_voxels=self.loading.max_voxels, head_check=self.loading.head_check,
                limits=self.loading.zip_limits,
            )  # fmt: skip
        except SkipError as exc:
            return Prepared(i, None, f"{exc.code}: {exc}", skipped=True)
        except VolumeError as exc:  # reasons are stored: a reader's message must not carry the scan's paths
            return Prepared(i, None, ref.redact(str(exc)))
        except (KeyboardInterrupt, SourceUnavailable):  # the archive itself is gone: stop, keep what is stored
            raise
        except MemoryError:  # this scan needs more memory than there is: its failure, not the run's
            return Prepared(i, None, "out of memory while loading it (MemoryError); see --max-voxels")
        except Exception as exc:  # a long archive run never dies on one bad scan
            log.debug("unexpected failure on %s", ref.source, exc_info=True)
            return Prepared(i, None, ref.redact(f"{type(exc).__name__}: {exc}"))
        return Prepared(i, x, None, {**ref.facts, **facts})


def on_device(item: Prepared, ref: SeriesRef, *, config: AnyPreprocessConfig, loading: Loading) -> Prepared:
    """A decoded item preprocessed in this process on ``loading.preprocess_device`` (head check first)."""
    hu, affine, meta, stack = item.decoded
    try:
        volume = Volume(array=hu.numpy(), affine=affine, meta=meta, stack=stack)
        # a slice stack (zones, tilt) is checked as stored: its mean spacing spans its true extent
        check_scan(volume.array, spacing_zyx=volume.spacing_xyz[::-1], head_check=loading.head_check)
        x = preprocess(volume, config=config, device=loading.preprocess_device)
    except SkipError as exc:
        return replace(item, reason=f"{exc.code}: {exc}", skipped=True, decoded=None)
    except VolumeError as exc:
        return replace(item, reason=ref.redact(str(exc)), decoded=None)
    return replace(item, x=x, meta={**item.meta, **source_facts(volume)}, decoded=None)


def _collate(items: list[Prepared]) -> list[Prepared]:
    return items


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # one process per core; no oversubscription
    retain_freed_memory()  # each scan reuses the last one's pages instead of faulting fresh ones in


@dataclass(frozen=True)
class Outcome:
    """What became of one scan in this run: ``embedded`` (its vector goes alongside) or ``failed``.

    Holds everything the database needs (scans and status rows), so it can travel through a Parquet shard
    (:mod:`hctembed.embedding.shards`) and be stored later exactly as a single-process run stores it.
    """

    position: int  # index in the run's list of refs: the order vectors are stored in (and get their ids)
    source: str
    scan_id: str
    status: str
    reason: str | None
    file_size: int
    file_mtime_ns: int
    patient_id: str | None = None
    format: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    planes: bytes | None = None  # the montage planes (pictures.montage.PanelPlanes) of an embedded scan

    @classmethod
    def of(
        cls,
        position: int,
        ref: SeriesRef,
        *,
        reason: str | None = None,
        meta: dict | None = None,
        planes: bytes | None = None,
        skipped: bool = False,
    ) -> Outcome:
        """``reason``: why it failed (or, with ``skipped``, why it was skipped); None when embedded."""
        return cls(
            position=position,
            source=ref.source,
            scan_id=ref.scan_id,
            status=("skipped" if skipped else "failed") if reason else "embedded",
            reason=reason,
            file_size=ref.size,
            file_mtime_ns=ref.mtime_ns,
            patient_id=ref.patient_id,
            format=ref.format,
            meta={**(meta or {}), "flags": sorted(set((meta or {}).get("flags", [])) | set(ref.flags))},
            planes=planes,
        )


def encode_refs(
    todo: Sequence[tuple[int, SeriesRef]],
    *,
    encoder: Encoder,
    batch_size: int,
    num_workers: int,
    loading: Loading = Loading(),
) -> Iterator[tuple[list[Outcome], np.ndarray]]:
    """Load and preprocess in DataLoader workers (or, with ``loading.preprocess_device``, decode there and
    preprocess on that device), encode in batches on the encoder's device.

    Yields, batch by batch, each scan's Outcome (in ``todo`` order) and the vectors ``[n_embedded, dim]`` of
    the embedded ones, in the same order. A scan that cannot be used is a failed Outcome with its reason; with
    ``loading.head_check``, one whose image is not a head (:mod:`hctembed.head_check`) a skipped one.
    A worker process that dies (killed for memory, a crash in a decoder) costs only the scan that killed
    it: the scans it may have held are loaded again one per fresh worker, the one that kills its worker
    again fails with that reason, and the rest of the archive goes on in batches.
    """
    done = 0
    while done < len(todo):
        try:
            for outcomes, vectors in _encode_batches(
                todo[done:], encoder=encoder, batch_size=batch_size, num_workers=num_workers, loading=loading
            ):
                done += len(outcomes)
                yield outcomes, vectors
        except RuntimeError as exc:
            if num_workers == 0 or "DataLoader worker" not in str(exc):
                raise
            suspects = todo[done : done + (2 * num_workers + 1) * batch_size]  # every batch a worker may have held
            log.warning("a loader process died (%s); loading its %d scan(s) one at a time", exc, len(suspects))
            for one in suspects:
                try:
                    yield from _encode_batches([one], encoder=encoder, batch_size=1, num_workers=1, loading=loading)
                except RuntimeError as again:
                    if "DataLoader worker" not in str(again):
                        raise
                    position, ref = one
                    reason = f"its loader process died while reading it ({again}); out of memory?"
                    log.warning("failed %s: %s", ref.source, reason)
                    yield [Outcome.of(position, ref, reason=reason)], np.zeros((0, encoder.dim), np.float32)
            done += len(suspects)


def _encode_batches(
    todo: Sequence[tuple[int, SeriesRef]],
    *,
    encoder: Encoder,
    batch_size: int,
    num_workers: int,
    loading: Loading,
) -> Iterator[tuple[list[Outcome], np.ndarray]]:
    refs = [ref for _, ref in todo]
    loader = DataLoader(
        ScanDataset(refs, config=encoder.preprocess, loading=loading),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
    for batch in loader:
        batch = [
            on_device(item, todo[item.position][1], config=encoder.preprocess, loading=loading)
            if item.decoded is not None else item
            for item in batch
        ]  # fmt: skip
        good = [item for item in batch if item.x is not None]
        vectors, planes, non_finite = np.zeros((0, encoder.dim), np.float32), None, {}
        if good:
            vectors, planes = encoder.encode_with_planes(torch.stack([item.x for item in good]))
            usable, why = usable_vectors(vectors)
            if not usable.all():  # never stored: such a vector matches nothing and breaks every score
                non_finite = {item.position: why[i] for i, item in enumerate(good) if not usable[i]}
                vectors = vectors[usable]
                planes = [p for p, ok in zip(planes, usable, strict=True) if ok] if planes else planes
        next_planes = iter(planes or [])
        outcomes = []
        for item in batch:
            position, ref = todo[item.position]
            reason = item.reason or non_finite.get(item.position)
            shown = next(next_planes, None) if reason is None else None
            outcomes.append(
                Outcome.of(position, ref, reason=reason, meta=item.meta, planes=shown, skipped=item.skipped)
            )
            if reason is not None:
                log.warning("%s %s: %s", "skipped" if item.skipped else "failed", ref.source, reason)
        yield outcomes, vectors
