"""Train a probe for one task on stored embeddings and register it; apply a probe to every stored scan and write
its scores. ``hctembed probe train|apply`` are these plus printing."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hctembed.errors import InputError
from hctembed.workflows.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)

KINDS = ("linear", "attentive")


@dataclass(frozen=True)
class ProbeTrainRequest:
    db: Path
    task: str
    out: Path  # .json (linear) or .safetensors (attentive)
    labels: Path | None = None  # a labels CSV; None: the labels stored in the database
    kind: str = "linear"
    model: str | None = None
    tokens: Path | None = None  # precomputed patch tokens for an attentive probe
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    epochs: int = 10

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"--kind must be linear or attentive, not {self.kind!r}")
        suffix = ".json" if self.kind == "linear" else ".safetensors"
        if self.out.suffix != suffix:
            raise InputError("--out must end in .json for a linear probe, .safetensors for an attentive one")


@dataclass(frozen=True)
class ProbeTrainResult:
    probe_id: str
    task: str
    model_id: str
    n_train: int
    n_test: int
    test_auc: float | None
    test_ap: float | None
    note: str | None
    path: Path

    def row(self) -> dict[str, Any]:
        return {
            "probe_id": self.probe_id,
            "task": self.task,
            "model_id": self.model_id,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "test_AUC": self.test_auc,
            "test_AP": self.test_ap,
            "note": self.note,
        }


def _tokens_for(collection, scan_ids, tokens: Path | None, progress: Progress) -> np.ndarray:
    """Patch tokens ``[N, T, D]``: from a file, or by running the collection's stored encoder on the scan files."""
    from hctembed.probe.tokens import compute_tokens, read_tokens_file

    if tokens is not None:
        return read_tokens_file(tokens, scan_ids)
    with progress.task("patch tokens", total=len(scan_ids)) as advance:
        return compute_tokens(collection, scan_ids, progress=advance)


def train_probe(request: ProbeTrainRequest, *, progress: Progress = NO_PROGRESS) -> ProbeTrainResult:
    """Train on the patient-level train split, report test AUC/AP, save the probe and register it in the DB."""
    from hctembed.eval.classification import evaluate_task, fit_linear_probe, linear_fit_score
    from hctembed.eval.splits import patient_split
    from hctembed.index.store import ProbeRow, Store
    from hctembed.probe.scores import make_probe_id
    from hctembed.workflows.aligned import Source, labels_for, load_aligned

    table = labels_for(request.labels, db=request.db, columns=[request.task])
    data = load_aligned([Source(request.db, request.model)], labels=table)
    if any(p is None for p in data.patient_ids):
        raise InputError("patient-level splits need a patient_id for every scan (labels.csv column)")
    split = patient_split(data.patient_ids, ratios=request.ratios, seed=request.seed)
    y, seed = data.y[:, 0], request.seed
    model_id = data.sources[0]["model_id"]
    meta = {"model_id": model_id, "task": request.task, "split": split.to_dict()}
    train_idx = split.train[~np.isnan(y[split.train])]
    if request.kind == "linear":
        from hctembed.probe.linear_file import save_linear

        feats, fit, config = data.x[0], linear_fit_score(seed=seed), {"C": 1.0, "class_weight": "balanced"}
        result = evaluate_task(fit, feats, y, task=request.task, train=split.train, test=split.test, seed=seed)
        save_linear(fit_linear_probe(feats[train_idx], y[train_idx], seed=seed), request.out, meta=meta)
    else:
        from hctembed.probe.attentive import AttentiveConfig, attentive_fit_score, save_attentive, train_attentive

        with Store(request.db, read_only=True) as store:
            coll = store.resolve_collection(model_id=request.model)
            feats = _tokens_for(coll, data.scan_ids, request.tokens, progress)
        config = {"epochs": request.epochs, "seed": seed}
        fit = attentive_fit_score(config_kw=config)
        result = evaluate_task(fit, feats, y, task=request.task, train=split.train, test=split.test, seed=seed)
        probe = train_attentive(feats[train_idx], y[train_idx], config=AttentiveConfig(dim=feats.shape[2], **config))
        save_attentive(probe, request.out, meta=meta)
    probe_id = make_probe_id(kind=request.kind, model_id=model_id, task=request.task, content=request.out.read_bytes())
    with Store(request.db) as store:
        store.probes.register(
            ProbeRow(
                probe_id=probe_id,
                kind=request.kind,
                model_id=model_id,
                task=request.task,
                path=str(request.out.resolve()),
                config=config,
                metrics=result.to_dict(),
            )
        )
    return ProbeTrainResult(
        probe_id=probe_id,
        task=request.task,
        model_id=model_id,
        n_train=result.n_train,
        n_test=result.n_test,
        test_auc=result.auc.value if result.auc else None,
        test_ap=result.ap.value if result.ap else None,
        note=result.skip_reason,
        path=request.out,
    )


@dataclass(frozen=True)
class ProbeApplyResult:
    probe_id: str
    task: str
    model_id: str
    scored: int
    mean_score: float | None

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


def apply_probe(
    probe_file: Path, *, db: Path, tokens: Path | None = None, progress: Progress = NO_PROGRESS
) -> ProbeApplyResult:
    """Score every stored scan of the probe's model and write the scores to the DB (probe_scores)."""
    from hctembed.index.store import ProbeRow, Store
    from hctembed.probe.scores import make_probe_id

    if probe_file.suffix == ".json":
        from hctembed.probe.linear_file import load_linear

        probe, meta = load_linear(probe_file)
        kind = "linear"
    else:
        from hctembed.probe.attentive import load_attentive

        probe, meta = load_attentive(probe_file)
        kind = "attentive"
    if not {"model_id", "task"} <= set(meta):
        from hctembed.probe.attentive import ProbeError

        raise ProbeError(f"{probe_file}: the probe does not name its model and task (not written by probe train)")
    model_id, task = meta["model_id"], meta["task"]
    probe_id = make_probe_id(kind=kind, model_id=model_id, task=task, content=probe_file.read_bytes())
    with Store(db) as store:
        coll = store.resolve_collection(model_id=model_id)
        if coll.model_id != model_id:
            raise InputError(f"probe was trained on {model_id}, the DB holds {coll.model_id}")
        _, x, scan_ids = coll.vectors()
        if kind == "linear":
            scores = probe.scores(x)
        else:
            from hctembed.probe.attentive import attentive_scores

            scores = attentive_scores(probe, _tokens_for(coll, scan_ids, tokens, progress))
        if not store.probes.exists(probe_id):
            path = str(probe_file.resolve())
            store.probes.register(ProbeRow(probe_id=probe_id, kind=kind, model_id=model_id, task=task, path=path))
        n = store.probes.write_scores(probe_id=probe_id, model_id=model_id, task=task, scan_ids=scan_ids, scores=scores)
    return ProbeApplyResult(probe_id, task, model_id, n, float(scores.mean()) if n else None)
