"""kNN, linear probe, few-shot sampling, splits and metrics against scikit-learn and brute force."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from hctembed.eval.classification import (
    ap_score,
    balanced_indices,
    evaluate_task,
    fewshot_curve,
    fewshot_indices,
    fit_linear_probe,
    knn_fit_score,
    knn_proba,
    linear_fit_score,
    roc_auc,
)
from hctembed.eval.splits import patient_split


def separable(n=300, d=32, seed=0, shift=1.5):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(float)
    x = rng.normal(size=(n, d))
    x[:, 0] += shift * (2 * y - 1)
    return x, y


def test_auc_and_ap_equal_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = (rng.random(50) < 0.4).astype(int)
        s = np.round(rng.random(50), 1)  # many ties
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
        assert ap_score(y, s) == pytest.approx(average_precision_score(y, s))
    assert np.isnan(roc_auc(np.ones(5), np.arange(5)))


@pytest.mark.parametrize("k", [5, 20])
def test_knn_uniform_equals_sklearn(k):
    rng = np.random.default_rng(1)
    xtr, xte = rng.normal(size=(120, 16)), rng.normal(size=(40, 16))
    ytr = rng.integers(0, 3, 120)
    classes, proba = knn_proba(xtr, ytr, xte, k=k, weights="uniform")
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="uniform", algorithm="brute").fit(xtr, ytr)
    np.testing.assert_array_equal(classes, ref.classes_)
    np.testing.assert_allclose(proba, ref.predict_proba(xte))
    np.testing.assert_array_equal(classes[proba.argmax(1)], ref.predict(xte))


def test_knn_temperature_vote_is_dino_formula():
    rng = np.random.default_rng(2)
    xtr, xte = rng.normal(size=(50, 8)), rng.normal(size=(3, 8))
    ytr = rng.integers(0, 2, 50)
    _, proba = knn_proba(xtr, ytr, xte, k=7, temperature=0.07)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sim = unit(xte) @ unit(xtr).T
    for i in range(3):
        top = np.argsort(-sim[i])[:7]
        w = np.exp(sim[i, top] / 0.07)
        expected = np.array([w[ytr[top] == c].sum() for c in (0, 1)]) / w.sum()
        np.testing.assert_allclose(proba[i], expected)


def test_probes_beat_chance_on_separable_and_not_on_random():
    x, y = separable()
    split = patient_split([f"p{i}" for i in range(len(y))], ratios=(0.6, 0.0, 0.4), seed=0)
    for fit in (linear_fit_score(), knn_fit_score()):
        r = evaluate_task(fit, x, y, task="t", train=split.train, test=split.test)
        assert r.auc.value > 0.9 and r.ap.value > 0.7
        assert r.auc.low <= r.auc.value <= r.auc.high
        rand = evaluate_task(
            fit, np.random.default_rng(9).normal(size=x.shape), y, task="t", train=split.train, test=split.test
        )
        assert 0.35 <= rand.auc.value <= 0.65


def test_linear_probe_matches_sklearn_probabilities():
    from sklearn.linear_model import LogisticRegression

    x, y = separable(n=100, d=8)
    probe = fit_linear_probe(x, y, C=0.5)
    ref = LogisticRegression(C=0.5, class_weight="balanced", max_iter=2000).fit(x, y)
    np.testing.assert_allclose(probe.scores(x), ref.predict_proba(x)[:, 1], atol=1e-6)


def test_skip_reason_when_test_split_has_one_class():
    x, y = separable(n=40)
    y_test_neg = y.copy()
    test = np.flatnonzero(y == 0)[:5]
    train = np.setdiff1d(np.arange(40), test)
    r = evaluate_task(linear_fit_score(), x, y_test_neg, task="t", train=train, test=test)
    assert r.auc is None and "no positives" in r.skip_reason


def test_splits_are_patient_disjoint_deterministic_and_near_8_1_1():
    rng = np.random.default_rng(3)
    patients = [f"p{p}" for p in rng.integers(0, 400, 1200)]
    s = patient_split(patients, seed=7)
    parts = [set(np.asarray(patients)[idx]) for idx in (s.train, s.val, s.test)]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sorted(np.concatenate([s.train, s.val, s.test]).tolist()) == list(range(1200))
    np.testing.assert_allclose([s.train.size / 1200, s.val.size / 1200, s.test.size / 1200], [0.8, 0.1, 0.1], atol=0.02)
    again = patient_split(patients, seed=7)
    np.testing.assert_array_equal(s.test, again.test)
    assert not np.array_equal(s.test, patient_split(patients, seed=8).test)


def test_balanced_and_fewshot_sampling_counts():
    y = np.r_[np.ones(20), np.zeros(200)]
    rng = np.random.default_rng(0)
    idx = balanced_indices(y, n=500, rng=rng)
    assert idx.size == 500 and y[idx].sum() == 250
    for k in (8, 16):
        pick = fewshot_indices(y, k=k, rng=rng)
        assert pick.size == 2 * k and np.unique(pick).size == 2 * k and y[pick].sum() == k
    with pytest.raises(ValueError, match="K=32 needs 32 positives"):
        fewshot_indices(y, k=32, rng=rng)


def test_fewshot_curve_skips_unavailable_k_with_reason():
    x, y = separable(n=400, seed=4)
    split = patient_split([f"p{i}" for i in range(400)], ratios=(0.7, 0.0, 0.3), seed=0)
    points = fewshot_curve(
        linear_fit_score(), x, y, train=split.train, test=split.test, ks=(8, 16, 256), n_draws=5, n_resamples=20
    )
    assert [p.k for p in points] == [8, 16, 256]
    assert len(points[0].auc_per_draw) == 5 and points[0].auc.value > 0.8
    assert points[0].auc.value == pytest.approx(np.mean(points[0].auc_per_draw))
    assert points[2].auc is None and "K=256 needs 256 positives" in points[2].skip_reason


def test_fewshot_p_over_draws_is_the_exact_sign_flip_test_of_per_draw_differences():
    """``p_values_over_draws`` against numpy enumerating every sign pattern of the per-draw AUC differences (per
    task, and of the per-draw mean over tasks); with 4 draws it can never fall below 2/16."""
    import itertools

    from hctembed.eval.classification import linear_fit_score
    from hctembed.eval.fewshot import compare_fewshot
    from hctembed.eval.protocols import Aligned
    from hctembed.eval.splits import patient_split

    rng = np.random.default_rng(0)
    n = 160
    y = rng.integers(0, 2, size=(n, 2)).astype(np.float64)
    x_a = rng.normal(size=(n, 6))
    x_b = x_a.copy()
    x_b[:, :2] += 1.5 * y  # model b sees the labels, model a does not
    ids = [f"s{i:03d}" for i in range(n)]
    aligned = Aligned(model_ids=["a", "b"], x=[x_a, x_b], scan_ids=ids, patient_ids=ids, y=y, names=["T1", "T2"],
                      sources=[{}, {}])  # fmt: skip
    split = patient_split(ids, ratios=(0.6, 0.0, 0.4), seed=0)
    result = compare_fewshot(aligned, fit_score=lambda m: linear_fit_score(), split=split, ks=(4,), n_draws=4,
                             n_resamples=10, n_permutations=4000)  # fmt: skip

    def exact_p(d):
        d = np.asarray(d)
        observed = abs(d.mean())
        flips = [abs((np.array(s) * d).mean()) >= observed - 1e-12 for s in itertools.product((1, -1), repeat=d.size)]
        return float(np.mean(flips))

    per_draw = {}
    for task in ("T1", "T2"):
        a, b = (result.curve(task, m).points[0]["AUC_per_draw"] for m in ("a", "b"))
        per_draw[task] = (np.asarray(a), np.asarray(b))
        got = result.curve(task, "b").points[0]["p_values_over_draws"]["AUC"]
        assert got == pytest.approx(exact_p(np.subtract(b, a)), abs=0.03)
        assert got >= 2 / 16 - 0.03
    mean_a = np.mean([per_draw[t][0] for t in per_draw], axis=0)
    mean_b = np.mean([per_draw[t][1] for t in per_draw], axis=0)
    got = result.curve("mean", "b").points[0]["p_values_over_draws"]["AUC"]
    assert got == pytest.approx(exact_p(mean_b - mean_a), abs=0.03)
