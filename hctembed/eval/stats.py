"""Statistics of the FM-HCT Methods ('Statistical analysis'): bootstrap CIs and a paired permutation test.

* **Bootstrap CI** (percentile): the items (retrieval queries, or test samples) are resampled with
  replacement ``n_resamples`` times (100 by default, as in the paper); the statistic is recomputed on each
  resample and the CI is the (2.5, 97.5) percentile interval of those values. The point estimate is the
  statistic on the full data, not the bootstrap mean. Resamples on which the statistic is undefined (an
  AUC with one class only) are dropped and counted in ``n_dropped``.
* **Paired permutation test** (two-sided): two models scored on the same items. For per-item metric values
  (AP per query), each permutation swaps the two models' values of every item independently with
  probability 1/2, i.e. flips the sign of the per-item difference, and the statistic is the absolute
  mean difference. For metrics that are not a mean over items (AUC, AP over a test set), each permutation
  swaps the two models' *scores* per sample and recomputes ``|metric(a) - metric(b)|``.
  P = (1 + #{permuted statistic >= observed}) / (1 + n_permutations) (add-one, so P is never 0);
  1,000 permutations by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

DEFINITION = (
    "95% CI: percentile bootstrap over items (queries or test samples) with replacement, n_resamples "
    "resamples; point estimate on the full data; resamples where the metric is undefined are dropped. "
    "P value: two-sided paired permutation test; per permutation each item's two model values (or, for "
    "set-level metrics such as AUC, each sample's two model scores) are swapped with probability 1/2; "
    "statistic |mean difference| (or |metric difference|); P = (1 + #{perm >= observed}) / (1 + n_permutations)."
)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its percentile-bootstrap confidence interval."""

    value: float
    low: float
    high: float
    n: int  # items the estimate is computed on
    n_resamples: int
    n_dropped: int = 0  # resamples on which the statistic was undefined
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "n_resamples": self.n_resamples,
            "n_dropped": self.n_dropped,
            "confidence": self.confidence,
        }


@dataclass(frozen=True)
class PermutationTest:
    """Two-sided paired permutation test of model a against model b."""

    difference: float  # statistic(a) - statistic(b) on the observed data
    p_value: float
    n_permutations: int
    n: int

    def to_dict(self) -> dict:
        return {"difference": self.difference, "p_value": self.p_value, "n_permutations": self.n_permutations}


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - confidence) / 2
    low, high = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def bootstrap_mean(values: np.ndarray, *, n_resamples: int = 100, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of per-item ``values [N]`` with a percentile-bootstrap CI over the items."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n == 0:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, n_resamples, 0, confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    means = values[idx].mean(axis=1)
    low, high = _percentiles(means, confidence)
    return Estimate(float(values.mean()), low, high, n, n_resamples, 0, confidence)


def bootstrap_mean_of_groups(
    groups: list[np.ndarray], *, n_resamples: int = 100, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Unweighted mean over groups of each group's mean (e.g. mean mAP over labels), items resampled within
    each group independently. Empty groups are left out."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if not groups:
        nan = float("nan")
        return Estimate(nan, nan, nan, 0, n_resamples, 0, confidence)
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_resamples)
    for g in groups:
        boot += g[rng.integers(0, g.size, size=(n_resamples, g.size))].mean(axis=1)
    boot /= len(groups)
    low, high = _percentiles(boot, confidence)
    value = float(np.mean([g.mean() for g in groups]))
    return Estimate(value, low, high, sum(g.size for g in groups), n_resamples, 0, confidence)


def bootstrap_metric(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    scores: np.ndarray,
    *,
    n_resamples: int = 100,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """``metric(y, scores)`` on ``N`` samples with a percentile-bootstrap CI over the samples.

    Resamples on which the metric is undefined (it returns NaN, e.g. a single class) are dropped."""
    y = np.asarray(y)
    scores = np.asarray(scores)
    n = y.shape[0]
    value = float(metric(y, scores)) if n else float("nan")
    rng = np.random.default_rng(seed)
    boot = []
    dropped = 0
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n) if n else np.zeros(0, int)
        v = float(metric(y[idx], scores[idx])) if n else float("nan")
        if np.isnan(v):
            dropped += 1
        else:
            boot.append(v)
    low, high = _percentiles(np.asarray(boot), confidence)
    return Estimate(value, low, high, n, n_resamples, dropped, confidence)


def paired_permutation_test(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> PermutationTest:
    """Per-item paired values ``a [N]``, ``b [N]`` (e.g. AP per query of two models on the same queries).

    Each permutation swaps a[i] and b[i] with probability 1/2 (a sign flip of d = a - b); the statistic is
    |mean(d)| (|sum(weights * d)| with ``weights [N]``, e.g. 1 / (labels x queries of the label) for the
    mean mAP over labels); P is add-one: (1 + #{permuted >= observed}) / (1 + n_permutations)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two equal 1-D arrays, got {a.shape} and {b.shape}")
    d = a - b
    n = d.size
    if n == 0:
        return PermutationTest(float("nan"), float("nan"), n_permutations, 0)
    w = np.full(n, 1.0 / n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != d.shape:
        raise ValueError(f"weights shape {w.shape} != {d.shape}")
    wd = w * d
    observed = abs(wd.sum())
    rng = np.random.default_rng(seed)
    signs = rng.integers(0, 2, size=(n_permutations, n)) * 2 - 1
    perm = np.abs(signs @ wd)
    # a small tolerance so that float round-off in the identity permutation still counts as ">="
    count = int(np.sum(perm >= observed - 1e-12 * max(1.0, observed)))
    return PermutationTest(float(wd.sum()), (1 + count) / (1 + n_permutations), n_permutations, n)


def paired_permutation_test_scores(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    *,
    n_permutations: int = 1000,
    seed: int = 0,
) -> PermutationTest:
    """Two models' ``scores [N]`` for the same samples and labels ``y [N]``, a set-level metric (AUC, AP).

    Each permutation swaps the two models' scores of every sample with probability 1/2 and recomputes
    |metric(y, a') - metric(y, b')|; P is add-one as in :func:`paired_permutation_test`. Scores should be
    on a comparable scale (probabilities), as the swap assumes exchangeability under the null."""
    y = np.asarray(y)
    a = np.asarray(scores_a, dtype=np.float64)
    b = np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.shape[0] != y.shape[0]:
        raise ValueError(f"y, scores_a and scores_b must have one length, got {y.shape}, {a.shape}, {b.shape}")
    diff = float(metric(y, a) - metric(y, b))
    if np.isnan(diff):
        return PermutationTest(diff, float("nan"), n_permutations, y.shape[0])
    rng = np.random.default_rng(seed)
    observed = abs(diff)
    count = 0
    for _ in range(n_permutations):
        swap = rng.integers(0, 2, size=a.shape[0]).astype(bool).reshape((-1,) + (1,) * (a.ndim - 1))
        pa = np.where(swap, b, a)
        pb = np.where(swap, a, b)
        if abs(metric(y, pa) - metric(y, pb)) >= observed - 1e-12 * max(1.0, observed):
            count += 1
    return PermutationTest(diff, (1 + count) / (1 + n_permutations), n_permutations, y.shape[0])
