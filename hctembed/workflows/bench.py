"""The ``bench`` protocols from typed requests: read the labels, align the stored vectors of every model, split by
patient, run the protocol, and write its report. ``hctembed bench ...`` is this plus printing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hctembed.errors import InputError
from hctembed.eval.protocols import Aligned
from hctembed.eval.results import Comparison, FewshotComparison
from hctembed.eval.splits import Split
from hctembed.workflows.aligned import labels_for, load_aligned, sources_of
from hctembed.workflows.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchInputs:
    """What every protocol reads: the databases (one model per file, or several models in one), labels, split."""

    dbs: tuple[Path, ...]
    labels: Path | None = None  # a labels CSV; None: the labels stored in the first database
    models: tuple[str, ...] = ()
    columns: tuple[str, ...] | None = None  # default: every 0/1 column
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0  # split, sampling, bootstrap and permutations
    n_resamples: int = 100
    n_permutations: int = 1000

    def __post_init__(self) -> None:
        if len(self.ratios) != 3:
            raise InputError(f"--ratios needs three numbers (train,val,test), got {self.ratios!r}")


@dataclass(frozen=True)
class RetrievalRequest:
    inputs: BenchInputs
    exclude_same_patient: bool = False
    compare: bool = False  # bootstrap CIs and P values even for one model


@dataclass(frozen=True)
class KnnRequest:
    inputs: BenchInputs
    k: int = 20
    temperature: float = 0.07
    uniform: bool = False


@dataclass(frozen=True)
class LinearRequest:
    inputs: BenchInputs
    C: float = 1.0


@dataclass(frozen=True)
class AttentiveRequest:
    inputs: BenchInputs
    tokens: tuple[Path, ...] = ()  # precomputed patch tokens, one per model in order
    epochs: int = 10
    samples_per_epoch: int = 500
    heads: int = 4


@dataclass(frozen=True)
class FewshotRequest:
    inputs: BenchInputs
    ks: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    draws: int = 5
    probe: str = "linear"  # or knn

    def __post_init__(self) -> None:
        if self.probe not in ("linear", "knn"):
            raise InputError(f"--probe must be linear or knn, not {self.probe!r}")


@dataclass(frozen=True)
class SingleRetrieval:
    """One model's plain retrieval report (no CIs): what ``bench retrieval`` shows for a single model."""

    model_id: str
    report: Any  # hctembed.eval.retrieval.RetrievalReport
    exclude_same_patient: bool = False
    protocol: str = field(default="retrieval-single", init=False)

    def rows(self) -> list[dict]:
        return [{"model_id": self.model_id, **row} for row in self.report.rows()]

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, **self.report.to_dict()}


def load(inputs: BenchInputs) -> Aligned:
    """The labels and every model's vectors on the same scans."""
    table = labels_for(inputs.labels, db=inputs.dbs[0], columns=inputs.columns)
    return load_aligned(sources_of(inputs.dbs, inputs.models), labels=table)


def load_split(inputs: BenchInputs) -> tuple[Aligned, Split]:
    """Aligned data and its patient-level split (every scan needs a patient id)."""
    from hctembed.eval.splits import patient_split

    data = load(inputs)
    if any(p is None for p in data.patient_ids):
        raise InputError("patient-level splits need a patient_id for every scan (labels.csv column)")
    return data, patient_split(data.patient_ids, ratios=inputs.ratios, seed=inputs.seed)


def run_retrieval(request: RetrievalRequest) -> Comparison | SingleRetrieval:
    """All-vs-all retrieval per label; with several models (or ``compare``) CIs and P values as well."""
    from hctembed.eval.protocols import compare_retrieval, need_patients
    from hctembed.eval.retrieval import all_vs_all

    data = load(request.inputs)
    if len(data.model_ids) > 1 or request.compare:
        return compare_retrieval(
            data,
            exclude_same_patient=request.exclude_same_patient,
            n_resamples=request.inputs.n_resamples,
            n_permutations=request.inputs.n_permutations,
            seed=request.inputs.seed,
        )
    patients = need_patients(data) if request.exclude_same_patient else data.patient_ids
    report = all_vs_all(
        data.x[0],
        data.y,
        label_names=data.names,
        patient_ids=patients,
        exclude_same_patient=request.exclude_same_patient,
    )
    return SingleRetrieval(data.sources[0]["model_id"], report, request.exclude_same_patient)


def _compare(data: Aligned, split: Split, inputs: BenchInputs, *, method: str, fit, features=None) -> Comparison:
    from hctembed.eval.protocols import compare_classification

    return compare_classification(
        data,
        method=method,
        fit_score=lambda m: fit,
        split=split,
        features=features,
        n_resamples=inputs.n_resamples,
        n_permutations=inputs.n_permutations,
        seed=inputs.seed,
    )


def run_knn(request: KnnRequest) -> Comparison:
    """kNN per label: cosine, k nearest training scans, temperature-weighted (or uniform) vote; AUC and AP."""
    from hctembed.eval.classification import knn_fit_score

    data, split = load_split(request.inputs)
    weights = "uniform" if request.uniform else "temperature"
    fit = knn_fit_score(k=request.k, temperature=request.temperature, weights=weights)
    results = _compare(data, split, request.inputs, method="knn", fit=fit)
    return results.with_settings(params={"k": request.k, "temperature": request.temperature, "weights": weights})


def run_linear(request: LinearRequest) -> Comparison:
    """Logistic regression (classes balanced) per label on frozen embeddings; AUC and AP."""
    from hctembed.eval.classification import linear_fit_score

    data, split = load_split(request.inputs)
    fit = linear_fit_score(C=request.C, seed=request.inputs.seed)
    results = _compare(data, split, request.inputs, method="linear", fit=fit)
    return results.with_settings(params={"C": request.C, "class_weight": "balanced"})


def patch_tokens(data: Aligned, *, tokens: tuple[Path, ...] = (), progress: Progress = NO_PROGRESS) -> list[np.ndarray]:
    """Every model's patch tokens ``[N, T, D]`` for the aligned scans: from files, or recomputed by running each
    stored encoder on the scan files."""
    from hctembed.index.store import Store
    from hctembed.probe.tokens import compute_tokens, read_tokens_file

    if tokens and len(tokens) != len(data.model_ids):
        raise InputError(f"{len(tokens)} --tokens for {len(data.model_ids)} models")
    if tokens:
        return [read_tokens_file(path, data.scan_ids) for path in tokens]
    feats = []
    for src in data.sources:
        with Store(Path(src["db"]), read_only=True) as store:
            coll = next(c for c in store.collections() if c.collection_id == src["collection_id"])
            with progress.task(f"patch tokens, {src['model_id']}", total=len(data.scan_ids)) as advance:
                feats.append(compute_tokens(coll, data.scan_ids, progress=advance))
    return feats


def run_attentive(request: AttentiveRequest, *, progress: Progress = NO_PROGRESS) -> Comparison:
    """A learned query over each encoder's patch tokens per label (torch); AUC and AP."""
    from hctembed.probe.attentive import attentive_fit_score

    data, split = load_split(request.inputs)
    feats = patch_tokens(data, tokens=request.tokens, progress=progress)
    config = {
        "epochs": request.epochs,
        "samples_per_epoch": request.samples_per_epoch,
        "heads": request.heads,
        "seed": request.inputs.seed,
    }
    fit = attentive_fit_score(config_kw=config)
    results = _compare(data, split, request.inputs, method="attentive", fit=fit, features=feats)
    return results.with_settings(params=config)


def run_fewshot(request: FewshotRequest) -> FewshotComparison:
    """K positives + K negatives per task, several draws, a probe on frozen vectors; AUC and AP on the test part."""
    from hctembed.eval.classification import knn_fit_score, linear_fit_score
    from hctembed.eval.fewshot import compare_fewshot

    data, split = load_split(request.inputs)
    fit = linear_fit_score(seed=request.inputs.seed) if request.probe == "linear" else knn_fit_score()
    return compare_fewshot(
        data,
        fit_score=lambda m: fit,
        split=split,
        ks=list(request.ks),
        n_draws=request.draws,
        n_resamples=request.inputs.n_resamples,
        seed=request.inputs.seed,
        probe=request.probe,
        n_permutations=request.inputs.n_permutations,
    )


def write_results(
    results: Comparison | FewshotComparison | SingleRetrieval, *, out_dir: Path | None, out: Path | None = None
) -> list[Path]:
    """The report files: ``out_dir`` gets results.json, results.md and plots; ``out`` the results as JSON."""
    from hctembed.eval.report import write_report
    from hctembed.json_values import write_json

    written = []
    if out_dir is not None and not isinstance(results, SingleRetrieval):
        written += write_report(out_dir, results)
    if out is not None:
        written.append(write_json(out, results))
    return written
