"""Classification on frozen embeddings: linear probe, kNN baseline, few-shot; AUC and AP with bootstrap CIs.

Every task is one binary label (a haemorrhage subtype: positive vs not). Methods (FM-HCT, 'Fine tuning
and probing', 'Few-shot classification evaluation'):

* **linear probe**: scikit-learn ``LogisticRegression`` (L2, lbfgs) on the frozen embeddings. The paper
  draws a class-balanced subset each epoch; a full-batch logistic regression has no epochs, and the
  expectation of balanced sampling is equal total weight per class, so ``class_weight='balanced'`` is used.
  (The attentive probe, trained in epochs, samples balanced batches: ``hctembed.probe.attentive``.)
* **kNN** (DINO's evaluation): cosine similarity to the training embeddings, the k nearest (k = 20) vote
  with weight exp(similarity / T), T = 0.07; the class score is the vote share. ``weights='uniform'`` gives
  each neighbour weight 1 (then identical to scikit-learn's ``KNeighborsClassifier(metric='cosine')``).
* **few-shot**: K positives and K negatives drawn without replacement from the training split, K in
  (8, 16, 32, 64, 128, 256), 5 draws per K; a K the training split cannot supply is skipped with its
  reason. The paper fine-tunes the whole network; here the probe is trained on the K + K embeddings.
* **AUC**: area under the ROC curve (Mann-Whitney, ties count 1/2), **AP**: average precision as in
  scikit-learn (tie groups get the precision at their end). 95% CIs by bootstrap over test samples
  (100 resamples); for few-shot, over all (draw, resample) pairs pooled, the point value being the mean
  over draws.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import rankdata

from hctembed.errors import InputError
from hctembed.eval.retrieval import average_precision
from hctembed.eval.stats import Estimate, _percentiles, bootstrap_metric

log = logging.getLogger(__name__)

FEWSHOT_KS = (8, 16, 32, 64, 128, 256)

# (train_x, train_y, test_x) -> scores for the positive class [M]
FitScore = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """AUC of binary ``y [N]`` against ``scores [N]`` by the rank-sum statistic; NaN with one class only."""
    y = np.asarray(y) > 0.5
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))  # average ranks: ties count 1/2
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ap_score(y: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of binary ``y [N]`` ranked by ``scores [N]``; NaN without positives."""
    return average_precision(np.asarray(scores, dtype=np.float64), np.asarray(y) > 0.5)


def balanced_indices(y: np.ndarray, *, n: int, rng: np.random.Generator) -> np.ndarray:
    """One epoch's class-balanced sample: ``n // 2`` positives and ``n - n // 2`` negatives, drawn with
    replacement from ``y [N]``, shuffled. Returns indices ``[n]``."""
    y = np.asarray(y) > 0.5
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if pos.size == 0 or neg.size == 0:
        raise InputError("balanced sampling needs at least one positive and one negative")
    idx = np.concatenate([rng.choice(pos, n // 2), rng.choice(neg, n - n // 2)])
    return rng.permutation(idx)


# -- kNN ------------------------------------------------------------------------------------------------
def knn_proba(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    weights: str = "temperature",
) -> tuple[np.ndarray, np.ndarray]:
    """Class scores of ``test_x [M, D]`` from the ``k`` most cosine-similar of ``train_x [N, D]``.

    Returns ``(classes [C], proba [M, C])``: the weighted vote share of each class (rows sum to 1).
    ``weights``: 'temperature' (exp(sim / T), DINO) or 'uniform'."""
    if weights not in ("temperature", "uniform"):
        raise InputError(f"weights must be 'temperature' or 'uniform', not {weights!r}")
    train_x = _unit(train_x)
    test_x = _unit(test_x)
    classes, codes = np.unique(np.asarray(train_y), return_inverse=True)
    k = min(k, train_x.shape[0])
    sim = test_x @ train_x.T  # [M, N]
    # stable order: larger similarity first, then lower training index (as a stable argsort would)
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    top_sim = np.take_along_axis(sim, top, axis=1)
    w = np.exp(top_sim / temperature) if weights == "temperature" else np.ones_like(top_sim)
    votes = np.zeros((test_x.shape[0], classes.size))
    np.add.at(votes, (np.repeat(np.arange(test_x.shape[0]), k), codes[top].reshape(-1)), w.reshape(-1))
    return classes, votes / votes.sum(axis=1, keepdims=True)


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
    weights: str = "temperature",
) -> np.ndarray:
    """Binary task: the positive class's vote share ``[M]`` (0 when no neighbour is positive)."""
    classes, proba = knn_proba(train_x, train_y, test_x, k=k, temperature=temperature, weights=weights)
    pos = np.flatnonzero(classes > 0.5)
    return proba[:, pos[0]] if pos.size else np.zeros(len(test_x))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("zero embedding vector: cannot normalise")
    return x / norms


# -- linear probe -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearProbe:
    """Logistic regression on embeddings: P(positive | x) = sigmoid(x @ coef + intercept), ``coef [D]``."""

    coef: np.ndarray
    intercept: float
    C: float

    def scores(self, x: np.ndarray) -> np.ndarray:
        """``x [N, D]`` -> probabilities ``[N]``."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.coef.size:
            raise ValueError(f"probe takes [N, {self.coef.size}] embeddings, got {x.shape}")
        z = x @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))


def fit_linear_probe(x: np.ndarray, y: np.ndarray, *, C: float = 1.0, seed: int = 0) -> LinearProbe:
    """Fit on ``x [N, D]``, binary ``y [N]``, classes balanced by weight (see module docstring)."""
    from sklearn.linear_model import LogisticRegression

    y = (np.asarray(y) > 0.5).astype(int)
    if np.unique(y).size < 2:
        raise InputError("a linear probe needs positives and negatives in its training data")
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=2000, random_state=seed)
    clf.fit(np.asarray(x, dtype=np.float64), y)
    return LinearProbe(coef=clf.coef_[0].astype(np.float64), intercept=float(clf.intercept_[0]), C=C)


def linear_fit_score(*, C: float = 1.0, seed: int = 0) -> FitScore:
    def fit_score(train_x, train_y, test_x):
        return fit_linear_probe(train_x, train_y, C=C, seed=seed).scores(test_x)

    return fit_score


def knn_fit_score(*, k: int = 20, temperature: float = 0.07, weights: str = "temperature") -> FitScore:
    def fit_score(train_x, train_y, test_x):
        return knn_scores(train_x, train_y, test_x, k=k, temperature=temperature, weights=weights)

    return fit_score


# -- evaluation -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskResult:
    """One task's test metrics; ``skip_reason`` set (and metrics NaN) when it could not be evaluated."""

    task: str
    n_train: int
    n_test: int
    n_test_positive: int
    auc: Estimate | None
    ap: Estimate | None
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))  # test scores [n_test]
    skip_reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "n_test_positive": self.n_test_positive,
            "AUC": self.auc.to_dict() if self.auc else None,
            "AP": self.ap.to_dict() if self.ap else None,
            "skip_reason": self.skip_reason,
        }


def _check_binary(y: np.ndarray, what: str) -> str | None:
    n_pos = int((y > 0.5).sum())
    if n_pos == 0 or n_pos == y.size:
        return f"{what} has {'no positives' if n_pos == 0 else 'no negatives'} ({y.size} scans)"
    return None


def evaluate_task(
    fit_score: FitScore,
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: str,
    train: np.ndarray,
    test: np.ndarray,
    n_resamples: int = 100,
    seed: int = 0,
) -> TaskResult:
    """Train on ``x[train]`` (any per-scan features ``[N, ...]``), score ``x[test]``; AUC and AP with CIs.

    Scans whose label is unknown (NaN) are left out of both parts."""
    y = np.asarray(y, dtype=np.float64)
    train = train[~np.isnan(y[train])]
    test = test[~np.isnan(y[test])]
    yt = y[test]
    reason = _check_binary(y[train], "training split") or _check_binary(yt, "test split")
    if reason:
        return TaskResult(task, train.size, test.size, int((yt > 0.5).sum()), None, None, skip_reason=reason)
    scores = np.asarray(fit_score(x[train], y[train], x[test]), dtype=np.float64)
    auc = bootstrap_metric(roc_auc, yt, scores, n_resamples=n_resamples, seed=seed)
    ap = bootstrap_metric(ap_score, yt, scores, n_resamples=n_resamples, seed=seed)
    return TaskResult(task, train.size, test.size, int((yt > 0.5).sum()), auc, ap, scores)


def fewshot_indices(y: np.ndarray, *, k: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``k`` positive and ``k`` negative positions of binary ``y [N]``, without replacement.

    Raises ValueError (with the reason) when ``y`` holds fewer than k of either class."""
    y = np.asarray(y) > 0.5
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if pos.size < k or neg.size < k:
        raise InputError(f"K={k} needs {k} positives and {k} negatives; training split has {pos.size} and {neg.size}")
    return np.sort(np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)]))


@dataclass(frozen=True)
class FewShotPoint:
    k: int
    auc: Estimate | None
    ap: Estimate | None
    auc_per_draw: list[float]
    ap_per_draw: list[float]
    skip_reason: str | None = None
    mean_scores: np.ndarray | None = None  # test scores averaged over the draws (for paired tests); not saved

    def to_dict(self) -> dict:
        return {
            "K": self.k,
            "AUC": self.auc.to_dict() if self.auc else None,
            "AP": self.ap.to_dict() if self.ap else None,
            "AUC_per_draw": self.auc_per_draw,
            "AP_per_draw": self.ap_per_draw,
            "skip_reason": self.skip_reason,
        }


def fewshot_curve(
    fit_score: FitScore,
    x: np.ndarray,
    y: np.ndarray,
    *,
    train: np.ndarray,
    test: np.ndarray,
    ks: Sequence[int] = FEWSHOT_KS,
    n_draws: int = 5,
    n_resamples: int = 100,
    seed: int = 0,
) -> list[FewShotPoint]:
    """Few-shot AUC/AP per K: ``n_draws`` draws of K + K training scans, each scored on the whole test part."""
    y = np.asarray(y, dtype=np.float64)
    train = train[~np.isnan(y[train])]
    test = test[~np.isnan(y[test])]
    yt = y[test]
    test_reason = _check_binary(yt, "test split")
    points = []
    for k in ks:
        if test_reason:
            points.append(FewShotPoint(k, None, None, [], [], test_reason))
            continue
        rng = np.random.default_rng([seed, k])
        draws_auc, draws_ap, boot_auc, boot_ap, score_sum = [], [], [], [], np.zeros(yt.size)
        try:
            for d in range(n_draws):
                pick = train[fewshot_indices(y[train], k=k, rng=rng)]
                scores = np.asarray(fit_score(x[pick], y[pick], x[test]), dtype=np.float64)
                score_sum += scores
                draws_auc.append(roc_auc(yt, scores))
                draws_ap.append(ap_score(yt, scores))
                boot_auc.extend(_boot_values(roc_auc, yt, scores, n_resamples, seed + d))
                boot_ap.extend(_boot_values(ap_score, yt, scores, n_resamples, seed + d))
        except ValueError as exc:
            log.info("few-shot K=%d skipped: %s", k, exc)
            points.append(FewShotPoint(k, None, None, [], [], str(exc)))
            continue
        points.append(
            FewShotPoint(
                k,
                _pooled(draws_auc, boot_auc, n_resamples * n_draws, test.size),
                _pooled(draws_ap, boot_ap, n_resamples * n_draws, test.size),
                draws_auc,
                draws_ap,
                mean_scores=score_sum / n_draws,
            )
        )
    return points


def _boot_values(metric, y, scores, n_resamples, seed) -> list[float]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_resamples):
        idx = rng.integers(0, y.size, size=y.size)
        v = metric(y[idx], scores[idx])
        if not np.isnan(v):
            out.append(float(v))
    return out


def _pooled(per_draw: list[float], boot: list[float], n_total: int, n: int) -> Estimate:
    low, high = _percentiles(np.asarray(boot), 0.95)
    return Estimate(float(np.mean(per_draw)), low, high, n, n_total, n_total - len(boot))
