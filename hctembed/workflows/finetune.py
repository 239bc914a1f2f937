"""``hctembed finetune``: fine-tune an encoder (from a weight file or from scratch) with a classification layer
per task on an archive's labelled scans, and report test AUC and AP with bootstrap CIs.

Scans go through the per-scan preprocessing cache once; the patient-level split is the probes' (same function,
same seed, scans sorted by id). Each task is fine-tuned on its own, as in the paper, unless ``joint`` asks for one
backbone with a head per task (cheaper on a CPU). Outputs: ``OUT/results.json``; per run folder (``OUT/<task>``,
or ``OUT`` when joint) ``encoder.safetensors`` + ``encoder.json`` (usable by ``embed --weights``),
``head.safetensors``, ``log.jsonl`` and ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hctembed.errors import InputError
from hctembed.finetune.settings import FinetuneConfig
from hctembed.workflows.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)

DEFINITION = (
    "test AUC and AP of the positive-class probability on the held-out patients' scans (patient-level split); "
    "95% CIs: percentile bootstrap over test scans"
)


@dataclass(frozen=True)
class LabelledCache:
    """Cached base volumes of the labelled scans, sorted by scan id, and their labels ``y [N, T]`` (NaN unknown)."""

    scan_ids: list[str]
    patient_ids: list[str]
    paths: list[Path]
    y: np.ndarray
    tasks: tuple[str, ...]
    image_size: int
    failed: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class FinetuneRequest:
    archive: Path  # folder, file or manifest.parquet
    labels: Path
    tasks: tuple[str, ...]
    out: Path
    weights: Path | None = None  # None: from scratch
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    k_shot: int | None = None  # K positives + K negatives of the training part per task
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    joint: bool = False
    cache: Path | None = None  # default OUT/cache
    resume: bool = False
    device: str | None = None
    n_resamples: int = 100

    def __post_init__(self) -> None:
        if not self.tasks:
            raise InputError("name at least one --task (a 0/1 label column)")
        if self.k_shot is not None and self.k_shot < 1:
            raise InputError("--k-shot must be >= 1")
        if self.k_shot is not None and self.joint and len(self.tasks) > 1:
            raise InputError("--k-shot draws K positives and negatives per task: use it without --joint")


def image_size_of(*, model: str, weights: Path | None) -> int:
    """The model input edge: the weight file's, or the preset's."""
    from hctembed.config import VIT_PRESETS
    from hctembed.model.checkpoint import read_config

    if weights is None:
        return VIT_PRESETS[model].image_size
    if not Path(weights).exists():
        raise InputError(f"weights file not found: {weights}")
    return read_config(weights).image_size


def labelled_cache(
    archive: Path, labels: Path, *, tasks: tuple[str, ...], image_size: int, cache: Path, progress: Progress
) -> LabelledCache:
    """Every labelled, readable scan of the archive as a cached base volume, with its labels and patient."""
    from hctembed.augment import base_preprocess
    from hctembed.io.labels import read_labels
    from hctembed.io.sources import FindOptions, open_source
    from hctembed.pretrain.cache import build_cache

    table = read_labels(labels, columns=list(tasks))
    found = open_source(archive).find(FindOptions())
    known = {s for s, row in zip(table.scan_ids, table.values, strict=True) if not np.all(np.isnan(row))}
    refs = sorted((r for r in found.selected if r.scan_id in known), key=lambda r: r.scan_id)
    if not refs:
        raise InputError(f"no scan of {archive} has a label in {labels} for {', '.join(tasks)}")
    from hctembed import distributed as ddp

    rank, world = ddp.rank_world()
    if world > 1:  # under torchrun each process builds every world-th missing file first
        build_cache(refs, folder=cache, config=base_preprocess(image_size=image_size), shard=(rank, world))
        ddp.barrier()
    with progress.task("preprocessing (cache)", total=len(refs)) as advance:
        scans, failed = [], []
        for ref in refs:  # one at a time, so that the bar moves
            got, bad = build_cache([ref], folder=cache, config=base_preprocess(image_size=image_size))
            scans += got
            failed += bad
            advance(1)
    for source, reason in failed:
        log.warning("skipped %s: %s", source, reason)
    patients = table.patients()
    missing = [s.scan_id for s in scans if not patients.get(s.scan_id)]
    if missing:
        raise InputError(f"patient-level splits need a patient_id for every scan (labels.csv), e.g. {missing[:3]}")
    ids = [s.scan_id for s in scans]
    return LabelledCache(
        scan_ids=ids,
        patient_ids=[patients[s] for s in ids],
        paths=[s.path for s in scans],
        y=table.for_scans(ids).astype(np.float32),
        tasks=tuple(tasks),
        image_size=image_size,
        failed=failed,
    )


def task_metrics(y: np.ndarray, scores: np.ndarray, *, n_resamples: int, seed: int) -> dict[str, Any]:
    """AUC and AP with bootstrap CIs on the known labels, or the reason they cannot be computed."""
    from hctembed.eval.classification import ap_score, roc_auc
    from hctembed.eval.stats import bootstrap_metric

    keep = ~np.isnan(y)
    yk, sk = y[keep], scores[keep]
    n_pos = int(yk.sum())
    row: dict[str, Any] = {"n_test": int(keep.sum()), "n_test_positive": n_pos}
    if n_pos == 0 or n_pos == yk.size:
        return row | {"skip_reason": f"test part has {'no positives' if n_pos == 0 else 'no negatives'}"}
    return row | {
        "AUC": bootstrap_metric(roc_auc, yk, sk, n_resamples=n_resamples, seed=seed).to_dict(),
        "AP": bootstrap_metric(ap_score, yk, sk, n_resamples=n_resamples, seed=seed).to_dict(),
    }


def _train_part(y: np.ndarray, train: np.ndarray, *, k_shot: int | None, seed: int) -> np.ndarray:
    """The training positions: all with a known label, or K positives + K negatives of them."""
    from hctembed.eval.classification import fewshot_indices

    train = train[~np.isnan(y[train])] if y.ndim == 1 else train
    if k_shot is None:
        return train
    return train[fewshot_indices(y[train], k=k_shot, rng=np.random.default_rng([seed, k_shot]))]


def _untrainable(y: np.ndarray, tasks: tuple[str, ...]) -> str | None:
    """Why the training part cannot train these tasks (a task without positives or negatives), or None."""
    for j, task in enumerate(tasks):
        known = y[~np.isnan(y[:, j]), j]
        if known.sum() == 0 or known.sum() == known.size:
            return f"the training part has {'no positives' if known.sum() == 0 else 'no negatives'} for {task}"
    return None


def _export(result, folder: Path, *, tasks: tuple[str, ...], card: dict) -> dict[str, str]:
    """The fine-tuned encoder (for ``embed --weights``) and its classification layer."""
    import torch
    from safetensors.torch import save_file

    from hctembed.pretrain.export import export_backbone

    classifier = result.classifier
    encoder = export_backbone(classifier.backbone, folder, card=card)
    head = folder / "head.safetensors"
    # the classification layer, the batch standardisation in front of it (its running mean and variance) and, with
    # --pool attentive, the attention pooling
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()
             if k.startswith(("head.", "norm.", "attend."))}  # fmt: skip
    meta = {"tasks": json.dumps(list(tasks)), "encoder": encoder.name, "pool": classifier.pool,
            "head_norm": json.dumps(not isinstance(classifier.norm, torch.nn.Identity))}  # fmt: skip
    save_file(state, str(head), metadata=meta)
    return {"encoder": str(encoder), "head": str(head)}


def run_finetune(request: FinetuneRequest, *, progress: Progress = NO_PROGRESS) -> dict[str, Any] | None:
    """Fine-tune, evaluate on the test part, export; returns (and writes) ``results.json``'s content.

    Under torchrun every process trains on its share of each step (DDP, gradients averaged); rank 0 evaluates,
    exports and writes, and returns the results; the other ranks return None."""
    import torch

    from hctembed import distributed as ddp

    use_cuda = (request.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise InputError("--device cuda but torch sees no CUDA device")
    device = ddp.init_from_env(use_cuda=use_cuda)
    rank, _ = ddp.rank_world()
    try:
        return _run(request, device=device, rank=rank, progress=progress if rank == 0 else NO_PROGRESS)
    finally:
        ddp.shutdown()


def _run(request: FinetuneRequest, *, device, rank: int, progress: Progress) -> dict[str, Any] | None:
    from hctembed.eval.splits import patient_split
    from hctembed.finetune import predict, train_classifier
    from hctembed.json_values import write_json
    from hctembed.model.encoders import REGISTRY

    c = request.config
    size = image_size_of(model=c.model, weights=request.weights)
    data = labelled_cache(request.archive, request.labels, tasks=request.tasks, image_size=size,
                          cache=request.cache or request.out / "cache", progress=progress)  # fmt: skip
    split = patient_split(data.patient_ids, ratios=request.ratios, seed=c.seed)
    runs = [(request.tasks, request.out)] if request.joint else [((t,), request.out / t) for t in request.tasks]
    rows, outputs = [], {}
    for tasks, folder in runs:
        cols = [request.tasks.index(t) for t in tasks]
        y = data.y[:, cols]
        try:
            train = split.train if len(cols) > 1 else _train_part(y[:, 0], split.train, k_shot=request.k_shot,
                                                                  seed=c.seed)  # fmt: skip
        except InputError as exc:  # too few positives or negatives for K: this task only
            train, reason = split.train[:0], str(exc)
        else:
            reason = _untrainable(y[train], tasks)
        if reason:
            log.warning("%s: not fine-tuned: %s", ",".join(tasks), reason)
            rows += [{"task": t, "n_train": int(train.size), "skip_reason": reason} for t in tasks]
            continue
        log.info("fine-tuning %s on %d scans (%s)", ",".join(tasks), train.size, request.weights or "scratch")
        result = train_classifier(paths=data.paths, y=y, train=train, config=c, weights=request.weights,
                                  val=split.val, out=folder, resume=request.resume, device=device)  # fmt: skip
        if rank != 0:
            continue
        scores = predict(result.classifier, [data.paths[i] for i in split.test])
        card = {"source": "hctembed finetune", "tasks": list(tasks), **result.init, "preprocess": "paper",
                "fingerprint": _fingerprint(REGISTRY, size), "steps": result.steps_done,
                "data_count": int(train.size)}  # fmt: skip
        outputs["+".join(tasks)] = _export(result, folder, tasks=tasks, card=card)
        for j, task in enumerate(tasks):
            metrics = task_metrics(y[split.test, j], scores[:, j], n_resamples=request.n_resamples, seed=c.seed)
            rows.append({"task": task, "n_train": int(train.size), "samples_per_epoch": result.samples_per_epoch,
                         **metrics})  # fmt: skip
    if rank != 0:
        return None
    results = {
        "protocol": "finetune",
        "definition": DEFINITION,
        "init": "scratch" if request.weights is None else str(Path(request.weights).resolve()),
        "tasks": list(request.tasks),
        "k_shot": request.k_shot,
        "joint": request.joint,
        "settings": asdict(c),
        "n_scans": len(data.scan_ids),
        "failed": [{"source": s, "reason": r} for s, r in data.failed],
        "split": split.to_dict(),
        "rows": rows,
        "outputs": outputs,
    }
    write_json(request.out / "results.json", results)
    return results


def _fingerprint(registry, image_size: int) -> str:
    """The paper preprocessing's fingerprint at this input size (what ``embed`` will use)."""
    for spec in registry.values():
        if spec.preprocess.out_size == image_size and spec.preprocess.name == "paper":
            return spec.preprocess.fingerprint()
    return ""
