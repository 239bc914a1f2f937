"""``bench finetune`` and ``bench fewshot --finetune``: the same tasks fine-tuned from scratch and from one or more
weight files on the same patient-level split (FM-HCT Fig. 1 and Fig. 2), with bootstrap CIs and paired
permutation P values against the first model.

Fine-tuning plugs into the classification protocols as a fit-and-score function whose "features" are scan
positions: each call fine-tunes a fresh classifier on the training scans it is given and scores the test scans,
so the statistics are exactly those of the probes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hctembed.errors import InputError
from hctembed.eval.classification import FitScore
from hctembed.eval.protocols import Aligned
from hctembed.eval.results import Comparison, FewshotComparison
from hctembed.finetune.settings import FinetuneConfig
from hctembed.workflows.finetune import image_size_of, labelled_cache
from hctembed.workflows.progress import NO_PROGRESS, Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneBenchRequest:
    archive: Path
    labels: Path
    tasks: tuple[str, ...]
    out_dir: Path  # the cache goes here too unless ``cache`` is given
    weights: tuple[Path, ...] = ()
    scratch: bool = True  # scratch is the first model (the reference of the P values) when included
    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    n_resamples: int = 100
    n_permutations: int = 1000
    cache: Path | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise InputError("name at least one --task (a 0/1 label column)")
        if not self.weights and not self.scratch:
            raise InputError("nothing to compare: give --weights, or keep scratch in")


def model_name(weights: Path | None) -> str:
    """``scratch``, or the weight file named by its folder when it is the usual ``encoder.safetensors``."""
    if weights is None:
        return "scratch"
    path = Path(weights)
    return f"{path.parent.name}/{path.name}" if path.name == "encoder.safetensors" else path.stem


def finetune_fit_score(
    paths: list[Path], *, config: FinetuneConfig, weights: Path | None, device: str | None = None
) -> FitScore:
    """A FitScore over scan positions ``x [n, 1]``: fine-tune on the training positions, score the test ones."""
    from hctembed.finetune import predict, train_classifier

    def fit_score(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
        train_paths = [paths[int(i)] for i in x_train[:, 0]]
        result = train_classifier(paths=train_paths, y=np.asarray(y_train, np.float32)[:, None],
                                  train=np.arange(len(train_paths)), config=config, weights=weights,
                                  device=device)  # fmt: skip
        return predict(result.classifier, [paths[int(i)] for i in x_test[:, 0]])[:, 0]

    return fit_score


def _prepare(request: FinetuneBenchRequest, progress: Progress):
    """The labelled cache, the models (scratch first), their fit-score functions and the aligned view."""
    from hctembed.eval.splits import patient_split

    inits: list[Path | None] = ([None] if request.scratch else []) + list(request.weights)
    sizes = {image_size_of(model=request.config.model, weights=w) for w in inits}
    if len(sizes) > 1:
        raise InputError(f"the models take different input sizes ({sorted(sizes)}): compare like with like")
    size = sizes.pop()
    data = labelled_cache(request.archive, request.labels, tasks=request.tasks, image_size=size,
                          cache=request.cache or request.out_dir / "cache", progress=progress)  # fmt: skip
    split = patient_split(data.patient_ids, ratios=request.ratios, seed=request.config.seed)
    positions = np.arange(len(data.paths))[:, None]
    aligned = Aligned(
        model_ids=[model_name(w) for w in inits],
        x=[positions] * len(inits),
        scan_ids=data.scan_ids,
        patient_ids=list(data.patient_ids),
        y=data.y.astype(np.float64),
        names=list(request.tasks),
        sources=[{"init": model_name(w), "weights": str(w) if w else None} for w in inits],
    )
    fits = [finetune_fit_score(data.paths, config=request.config, weights=w, device=request.device) for w in inits]
    return aligned, split, fits


def run_bench_finetune(request: FinetuneBenchRequest, *, progress: Progress = NO_PROGRESS) -> Comparison:
    """Each task fine-tuned on the whole training part per model; AUC/AP on the test part, P vs the first."""
    from dataclasses import asdict

    from hctembed.eval.protocols import compare_classification

    data, split, fits = _prepare(request, progress)
    results = compare_classification(
        data,
        method="finetune",
        fit_score=lambda m: fits[m],
        split=split,
        n_resamples=request.n_resamples,
        n_permutations=request.n_permutations,
        seed=request.config.seed,
    )
    return results.with_settings(params=asdict(request.config))


def run_fewshot_finetune(
    request: FinetuneBenchRequest, *, ks: tuple[int, ...], draws: int, progress: Progress = NO_PROGRESS
) -> FewshotComparison:
    """Fine-tuning at each K (K positives + K negatives, ``draws`` draws) per task and model (Fig. 2)."""
    from dataclasses import asdict

    from hctembed.eval.fewshot import compare_fewshot

    data, split, fits = _prepare(request, progress)
    results = compare_fewshot(
        data,
        fit_score=lambda m: fits[m],
        split=split,
        ks=list(ks),
        n_draws=draws,
        n_resamples=request.n_resamples,
        seed=request.config.seed,
        probe="finetune",
        n_permutations=request.n_permutations,
    )
    return results.with_settings(params=asdict(request.config))
