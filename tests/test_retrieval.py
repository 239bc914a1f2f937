"""Retrieval metrics against independent references: scikit-learn, hand-worked rankings, brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from hctembed.eval.retrieval import all_vs_all, average_precision, expected_random_ap, precision_at_k


def test_average_precision_hand_worked():
    # ranking: R N R N N R  -> precisions at hits 1/1, 2/3, 3/6
    scores = np.array([6, 5, 4, 3, 2, 1.0])
    rel = np.array([1, 0, 1, 0, 0, 1], bool)
    assert average_precision(scores, rel) == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    # a tie of one relevant and one irrelevant item at the top: both share rank 2 -> precision 1/2
    assert average_precision(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 1], bool)) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.array([1.0, 0.5]), np.array([0, 0], bool)))


def test_average_precision_equals_sklearn_with_and_without_ties():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 6, n).astype(float) if trial % 2 else rng.normal(size=n)
        rel = rng.random(n) < rng.uniform(0.05, 0.6)
        if not rel.any():
            continue
        assert average_precision(scores, rel) == pytest.approx(average_precision_score(rel, scores), abs=1e-12)


def _brute_force_pk(scores, rel, k):
    """Mean precision@k over every order of tied items (the definition, enumerated)."""
    groups = [np.flatnonzero(scores == v) for v in sorted(set(scores.tolist()), reverse=True)]
    values = []
    for perms in itertools.product(*[itertools.permutations(g) for g in groups]):
        order = np.concatenate([np.array(p, int) for p in perms])
        values.append(rel[order[:k]].sum() / k)
    return float(np.mean(values))


def test_precision_at_k_hand_worked_and_tie_aware():
    scores = np.array([3, 2, 2, 2, 1.0])
    rel = np.array([1, 1, 0, 0, 1], bool)
    assert precision_at_k(scores, rel, k=1) == 1.0
    assert precision_at_k(scores, rel, k=2) == pytest.approx((1 + 1 / 3) / 2)
    assert precision_at_k(scores, rel, k=4) == pytest.approx(2 / 4)
    assert precision_at_k(scores, rel, k=10) == pytest.approx(3 / 10)  # divided by K, not by the gallery
    rng = np.random.default_rng(1)
    for _ in range(60):
        n = int(rng.integers(2, 8))
        s = rng.integers(0, 3, n).astype(float)
        r = rng.random(n) < 0.5
        for k in (1, 2, 3, 5):
            if k <= n:
                assert precision_at_k(s, r, k=k) == pytest.approx(_brute_force_pk(s, r, k))


def _reference_all_vs_all(x, y, patients, exclude_same_patient, ks):
    """Straightforward loops: for each label, each positive query, rank the rest with sklearn's AP."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for j in range(y.shape[1]):
        aps, pk = [], {k: [] for k in ks}
        for q in np.flatnonzero(y[:, j] == 1):
            gallery = [i for i in range(len(x)) if i != q and not (exclude_same_patient and patients[i] == patients[q])]
            s = np.array([float(x[q] @ x[i]) for i in gallery])
            r = y[gallery, j] == 1
            if not r.any():
                continue
            aps.append(average_precision_score(r, s))
            order = np.argsort(-s, kind="stable")
            for k in ks:
                pk[k].append(r[order[:k]].sum() / k)
        out.append((len(aps), np.mean(aps), {k: np.mean(v) for k, v in pk.items()}))
    return out


@pytest.mark.parametrize("exclude_same_patient", [False, True])
def test_all_vs_all_matches_loop_reference(exclude_same_patient):
    rng = np.random.default_rng(2)
    n, d = 80, 16
    y = (rng.random((n, 3)) < [0.3, 0.15, 0.05]).astype(float)
    x = rng.normal(size=(n, d)) + y @ rng.normal(size=(3, d)) * 1.5  # labels shape the embedding
    patients = [f"p{i // 2}" for i in range(n)]
    report = all_vs_all(
        x,
        y,
        label_names=["a", "b", "c"],
        patient_ids=patients,
        exclude_same_patient=exclude_same_patient,
        ks=(1, 5, 10),
    )
    expected = _reference_all_vs_all(x, y, patients, exclude_same_patient, (1, 5, 10))
    for lab, (nq, m_ap, pk) in zip(report.labels, expected, strict=True):
        assert lab.n_queries == nq
        assert lab.mAP == pytest.approx(m_ap, abs=1e-9)
        for k in (1, 5, 10):
            assert lab.precision_at[k] == pytest.approx(pk[k], abs=1e-9)
    assert report.mean()["mAP"] == pytest.approx(np.mean([e[1] for e in expected]))


def test_all_vs_all_blocks_do_not_change_results():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8))
    y = (rng.random((50, 2)) < 0.4).astype(float)
    a = all_vs_all(x, y, label_names=["a", "b"], block=7)
    b = all_vs_all(x, y, label_names=["a", "b"], block=1000)
    for la, lb in zip(a.labels, b.labels, strict=True):
        np.testing.assert_allclose(la.ap_per_query, lb.ap_per_query)


@pytest.mark.parametrize(("g", "r"), [(1, 1), (2, 1), (5, 2), (6, 3), (7, 7)])
def test_expected_random_ap_equals_enumeration_of_every_ranking(g, r):
    rel = np.zeros(g, bool)
    rel[:r] = True
    scores = np.arange(g, 0, -1, dtype=float)
    aps = [average_precision(scores, rel[list(order)]) for order in itertools.permutations(range(g))]
    assert expected_random_ap(np.array([g]), np.array([r]))[0] == pytest.approx(np.mean(aps), abs=1e-12)


def test_chance_level_beside_map_and_a_reason_for_labels_without_queries():
    rng = np.random.default_rng(5)
    y = np.zeros((40, 3))
    y[:12, 0] = 1  # 12 positives: each query sees 11 relevant among 39
    y[0, 1] = 1  # one positive: no other relevant scan in its gallery
    report = all_vs_all(rng.normal(size=(40, 8)), y, label_names=["a", "single", "none"])
    a, single, none = report.labels
    assert a.chance_mAP == pytest.approx(expected_random_ap(np.array([39]), np.array([11]))[0])
    assert 11 / 39 < a.chance_mAP < 11 / 39 + 0.1  # a little above the prevalence in a small gallery
    assert a.note == "" and "no other positive" in single.note and "no scan is positive" in none.note
    rows = {row["label"]: row for row in report.rows()}
    assert rows["a"]["chance"] == a.chance_mAP and rows["mean"]["chance"] == pytest.approx(a.chance_mAP)
    # random embeddings score about chance over many queries
    y2 = (rng.random((300, 1)) < 0.2).astype(float)
    lab = all_vs_all(rng.normal(size=(300, 16)), y2, label_names=["b"]).labels[0]
    assert abs(lab.mAP - lab.chance_mAP) < 0.03


def test_unknown_labels_and_singletons():
    x = np.eye(4) + 0.1
    y = np.array([[1.0], [np.nan], [0.0], [0.0]])
    report = all_vs_all(x, y, label_names=["a"])
    assert report.labels[0].n_queries == 0 and report.labels[0].n_skipped == 1  # the only positive
    assert np.isnan(report.labels[0].mAP)


def test_perfect_and_random_embeddings_bracket_the_metric():
    rng = np.random.default_rng(4)
    y = (rng.random((120, 1)) < 0.3).astype(float)
    perfect = np.hstack([y, 1 - y]) + rng.normal(scale=1e-3, size=(120, 2))
    assert all_vs_all(perfect, y, label_names=["a"]).labels[0].mAP == pytest.approx(1.0)
    random = all_vs_all(rng.normal(size=(120, 32)), y, label_names=["a"]).labels[0].mAP
    assert abs(random - y.mean()) < 0.1  # chance level = prevalence


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels shape"):
        all_vs_all(np.ones((3, 2)), np.ones((4, 1)), label_names=["a"])
    with pytest.raises(ValueError, match="patient"):
        all_vs_all(np.ones((3, 2)), np.ones((3, 1)), label_names=["a"], exclude_same_patient=True)
    with pytest.raises(ValueError, match="zero"):
        all_vs_all(np.zeros((3, 2)), np.ones((3, 1)), label_names=["a"])
