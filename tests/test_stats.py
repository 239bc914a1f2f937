"""Bootstrap CIs and the paired permutation test against their statistical promises on simulated data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from hctembed.eval.classification import roc_auc
from hctembed.eval.retrieval import all_vs_all, per_query_metrics
from hctembed.eval.stats import (
    bootstrap_mean,
    bootstrap_mean_of_groups,
    bootstrap_metric,
    paired_permutation_test,
    paired_permutation_test_scores,
)


def test_bootstrap_ci_covers_true_mean_near_nominal_rate():
    rng = np.random.default_rng(0)
    true = 0.6
    covered = 0
    for i in range(200):
        values = rng.beta(6, 4, size=80)  # mean 0.6, like per-query AP values
        est = bootstrap_mean(values, n_resamples=100, seed=i)
        assert est.low <= est.value <= est.high
        covered += est.low <= true <= est.high
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_auc_ci_coverage():
    rng = np.random.default_rng(1)
    # scores ~ N(0,1) for negatives and N(1,1) for positives: true AUC = Phi(1 / sqrt(2))
    true = sps.norm.cdf(1 / np.sqrt(2))
    covered = 0
    for i in range(200):
        y = np.r_[np.ones(60), np.zeros(60)]
        s = np.r_[rng.normal(1, 1, 60), rng.normal(0, 1, 60)]
        est = bootstrap_metric(roc_auc, y, s, n_resamples=100, seed=i)
        covered += est.low <= true <= est.high
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_is_seedable_and_groups_average():
    v = np.random.default_rng(2).random(30)
    assert bootstrap_mean(v, seed=3) == bootstrap_mean(v, seed=3)
    assert bootstrap_mean(v, seed=3).low != bootstrap_mean(v, seed=4).low
    groups = [v[:10], v[10:]]
    est = bootstrap_mean_of_groups(groups, seed=0)
    assert est.value == pytest.approx((v[:10].mean() + v[10:].mean()) / 2)
    assert est.low < est.value < est.high


def test_permutation_p_values_uniform_under_null_and_small_under_difference():
    rng = np.random.default_rng(3)
    ps = []
    for i in range(200):
        base = rng.random(40)
        a = base + rng.normal(0, 0.1, 40)
        b = base + rng.normal(0, 0.1, 40)  # same distribution: null true
        ps.append(paired_permutation_test(a, b, n_permutations=1000, seed=i).p_value)
    ps = np.asarray(ps)
    assert ps.min() >= 1 / 1001  # add-one convention: never 0
    assert sps.kstest(ps, "uniform").pvalue > 0.01  # loose: near-uniform
    assert 0.02 <= np.mean(ps < 0.05) <= 0.10
    base = rng.random(40)
    test = paired_permutation_test(base + 0.05 + rng.normal(0, 0.02, 40), base, seed=0)
    assert test.p_value == pytest.approx(1 / 1001)
    assert test.difference == pytest.approx(0.05, abs=0.01)


def test_permutation_matches_exact_enumeration_on_tiny_input():
    # with n = 6 there are 64 sign patterns; the Monte Carlo P (many permutations) approaches the exact one
    d = np.array([0.3, 0.1, -0.05, 0.2, 0.15, 0.25])
    signs = np.array(np.meshgrid(*[[-1, 1]] * 6)).reshape(6, -1).T
    exact = np.mean(np.abs(signs @ d) >= abs(d.sum()) - 1e-12)
    mc = paired_permutation_test(d, np.zeros(6), n_permutations=20000, seed=0).p_value
    assert mc == pytest.approx(exact, abs=0.01)


def test_score_permutation_for_auc():
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(50), np.zeros(50)]
    good = np.r_[rng.normal(2, 1, 50), rng.normal(0, 1, 50)]
    bad = rng.normal(0, 1, 100)
    sig = lambda s: 1 / (1 + np.exp(-s))  # noqa: E731
    assert paired_permutation_test_scores(roc_auc, y, sig(good), sig(bad), n_permutations=200).p_value < 0.01
    ps = []
    for i in range(60):
        a = np.r_[rng.normal(1, 1, 50), rng.normal(0, 1, 50)]
        b = np.r_[rng.normal(1, 1, 50), rng.normal(0, 1, 50)]
        ps.append(paired_permutation_test_scores(roc_auc, y, sig(a), sig(b), n_permutations=200, seed=i).p_value)
    assert 0.2 < np.median(ps) < 0.8


def test_per_query_metrics_agree_with_all_vs_all():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    labels = (rng.random((40, 3)) < 0.3).astype(float)
    patients = [f"p{i // 2}" for i in range(40)]
    kw = {"label_names": ["a", "b", "c"], "patient_ids": patients, "exclude_same_patient": True}
    report = all_vs_all(x, labels, **kw)
    pq = per_query_metrics(x, labels, **kw)
    for lab, q in zip(report.labels, pq, strict=True):
        np.testing.assert_allclose(q.ap, lab.ap_per_query)
        assert q.precision_at[5].mean() == pytest.approx(lab.precision_at[5])
        assert np.all(labels[q.query_index, report.labels.index(lab)] == 1)
