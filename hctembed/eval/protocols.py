"""Run one evaluation protocol over several models on the same scans: vectors aligned across stores,
metrics with bootstrap CIs, and paired permutation tests of every model against the first.

All models are scored on exactly the same scans (those with a vector in every source and a label), so
retrieval queries and classification test samples pair one to one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from hctembed.errors import HctembedError
from hctembed.eval import stats
from hctembed.eval.classification import (
    FitScore,
    ap_score,
    evaluate_task,
    roc_auc,
)
from hctembed.eval.results import Comparison, MetricRow
from hctembed.eval.retrieval import DEFINITION as RETRIEVAL_DEFINITION
from hctembed.eval.retrieval import no_query_reason, per_query_metrics
from hctembed.eval.splits import Split
from hctembed.io.labels import LabelTable

log = logging.getLogger(__name__)


class EvaluationError(HctembedError, ValueError):
    """The inputs cannot support the requested protocol; the message says why."""


@dataclass(frozen=True)
class ModelVectors:
    """One model's stored vectors, read by the caller (see :func:`hctembed.workflows.aligned.load_aligned`)."""

    name: str  # unique among the models compared
    vectors: dict[str, np.ndarray]  # scan id -> [D]
    patients: dict[str, str]  # scan id -> patient id, as stored
    info: dict  # where the vectors came from (db, model_id, collection_id)


@dataclass(frozen=True)
class Aligned:
    """Vectors of several models for the same ``N`` scans (sorted by scan id) with their labels."""

    model_ids: list[str]
    x: list[np.ndarray]  # per model [N, D_m]
    scan_ids: list[str]
    patient_ids: list[str | None]
    y: np.ndarray  # [N, L], NaN = unknown
    names: list[str]
    sources: list[dict]


def align(models: Sequence[ModelVectors], *, labels: LabelTable) -> Aligned:
    """Keep the scans every model has a vector for and that carry a label; patients from the labels first."""
    if not models:
        raise EvaluationError("no model to evaluate")
    labelled = {s for s, row in zip(labels.scan_ids, labels.values, strict=True) if not np.all(np.isnan(row))}
    common = set(labelled)
    for m in models:
        common &= set(m.vectors)
    for m in models:
        left_out = len(set(m.vectors) - common)
        if left_out:
            log.warning("%s: %d embedded scans are left out (no label, or missing from another model)", m.name,
                        left_out)  # fmt: skip
    if not common:
        raise EvaluationError("no scan has a label and a vector in every model: do the scan ids match?")
    unembedded = len(labelled - common)
    if unembedded:
        log.warning(
            "%d labelled scans have no vector in every model (not embedded, or failed) and are left out", unembedded
        )
    scan_ids = sorted(common)
    from_labels = labels.patients()
    stored: dict[str, str] = {}
    for m in models:
        for s, p in m.patients.items():
            stored.setdefault(s, p)
    return Aligned(
        model_ids=[m.name for m in models],
        x=[np.stack([m.vectors[s] for s in scan_ids]).astype(np.float32) for m in models],
        scan_ids=scan_ids,
        patient_ids=[from_labels.get(s) or stored.get(s) for s in scan_ids],
        y=labels.for_scans(scan_ids),
        names=list(labels.names),
        sources=[m.info for m in models],
    )


def need_patients(data: Aligned) -> list[str]:
    """The patient ids of every scan, or an error when one is missing (same-patient exclusion needs them)."""
    if any(p is None for p in data.patient_ids):
        raise EvaluationError("this protocol needs a patient_id for every scan (labels.csv column)")
    return [str(p) for p in data.patient_ids]


# -- retrieval -------------------------------------------------------------------------------------------
def compare_retrieval(
    data: Aligned,
    *,
    exclude_same_patient: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
    n_resamples: int = 100,
    n_permutations: int = 1000,
    seed: int = 0,
) -> Comparison:
    """All-vs-all retrieval per label for every model: mAP and P@K with bootstrap CIs over queries, and a
    paired permutation test (per-query AP, per-query P@K) of each model against the first."""
    patients = need_patients(data) if exclude_same_patient else data.patient_ids
    patients = patients if all(p is not None for p in patients) else None
    metrics = ["mAP", *[f"P@{k}" for k in ks]]
    per_model = []  # per model: {label: {metric: per-query values}}
    per_query_ap = {}
    for mid, x in zip(data.model_ids, data.x, strict=True):
        kw = {"label_names": data.names, "patient_ids": patients, "exclude_same_patient": exclude_same_patient}
        pq = per_query_metrics(x, data.y, ks=ks, **kw)  # one pass: AP, P@K and chance per query
        values = {}
        for q in pq:
            values[q.label] = {"mAP": q.ap, **{f"P@{k}": q.precision_at[k] for k in ks}}
            values[q.label]["_skipped"] = q.n_skipped
            values[q.label]["_chance"] = float(q.chance_ap.mean()) if q.ap.size else float("nan")
            values[q.label]["_note"] = no_query_reason(q) if not q.ap.size else None
        per_model.append(values)
        per_query_ap[mid] = {q.label: q.ap for q in pq}
    rows = []
    for label in [*data.names, "mean"]:
        for m, mid in enumerate(data.model_ids):
            row = {"row": label, "model": mid, "metrics": {}, "p_values": {}}
            for metric in metrics:
                if label == "mean":
                    groups = [per_model[m][lab][metric] for lab in data.names]
                    est = stats.bootstrap_mean_of_groups(groups, n_resamples=n_resamples, seed=seed)
                else:
                    est = stats.bootstrap_mean(per_model[m][label][metric], n_resamples=n_resamples, seed=seed)
                row["metrics"][metric] = est.to_dict()
                if m > 0:
                    row["p_values"][metric] = _retrieval_test(
                        per_model[0], per_model[m], label, metric, data.names, n_permutations, seed
                    )
            row["queries"] = row["metrics"]["mAP"]["n"]
            if label != "mean":
                row["skipped"] = per_model[m][label]["_skipped"]
                row["chance"] = per_model[m][label]["_chance"]
                row["skip_reason"] = per_model[m][label]["_note"]
            else:
                scored = [per_model[m][lab]["_chance"] for lab in data.names if per_model[m][lab]["mAP"].size]
                row["chance"] = float(np.mean(scored)) if scored else float("nan")
            rows.append(row)
    return Comparison(
        protocol="retrieval",
        models=list(data.model_ids),
        n_scans=len(data.scan_ids),
        metrics=metrics,
        rows=[MetricRow(**r) for r in rows],
        settings={
            "definition": RETRIEVAL_DEFINITION,
            "statistics": stats.DEFINITION,
            "sources": data.sources,
            "exclude_same_patient": exclude_same_patient,
            "ks": list(ks),
            "n_resamples": n_resamples,
            "n_permutations": n_permutations,
            "seed": seed,
            "per_query_ap": per_query_ap,
        },
    )


def _retrieval_test(first, other, label, metric, names, n_permutations, seed) -> float | None:
    if label == "mean":
        scored = [lab for lab in names if len(first[lab][metric])]
        if not scored:
            return None
        a = np.concatenate([first[lab][metric] for lab in scored])
        b = np.concatenate([other[lab][metric] for lab in scored])
        w = np.concatenate(
            [np.full(len(first[lab][metric]), 1.0 / (len(scored) * len(first[lab][metric]))) for lab in scored]
        )
        test = stats.paired_permutation_test(a, b, n_permutations=n_permutations, seed=seed, weights=w)
    else:
        test = stats.paired_permutation_test(
            first[label][metric], other[label][metric], n_permutations=n_permutations, seed=seed
        )
    return None if np.isnan(test.p_value) else test.p_value


# -- classification ------------------------------------------------------------------------------------------
def _mean_over_tasks(metric: Callable) -> Callable:
    """metric on ``y [N, T]`` / ``scores [N, T]``: the mean over tasks (NaN labels masked per task); NaN when
    any task is undefined on the sample, so a bootstrap drops that resample."""

    def mean_metric(y, scores):
        values = []
        for t in range(y.shape[1]):
            keep = ~np.isnan(y[:, t])
            values.append(metric(y[keep, t], scores[keep, t]))
        return float(np.mean(values)) if values else float("nan")

    return mean_metric


def compare_classification(
    data: Aligned,
    *,
    method: str,
    fit_score: Callable[[int], FitScore],
    split: Split,
    features: Sequence[np.ndarray] | None = None,
    n_resamples: int = 100,
    n_permutations: int = 1000,
    seed: int = 0,
) -> Comparison:
    """Train ``fit_score(model_index)`` on the split's train part per task and model; AUC/AP on its test part.

    ``features`` replaces ``data.x`` per model (patch tokens for the attentive probe)."""
    feats = list(features) if features is not None else data.x
    results = []  # [model][task] -> TaskResult
    for m in range(len(data.model_ids)):
        results.append(
            [
                evaluate_task(
                    fit_score(m),
                    feats[m],
                    data.y[:, t],
                    task=name,
                    train=split.train,
                    test=split.test,
                    n_resamples=n_resamples,
                    seed=seed,
                )
                for t, name in enumerate(data.names)
            ]
        )
    rows = []
    evaluated = [t for t in range(len(data.names)) if results[0][t].skip_reason is None]
    test = split.test
    for t, name in enumerate(data.names):
        yt = data.y[test, t]
        keep = ~np.isnan(yt)
        for m, mid in enumerate(data.model_ids):
            r = results[m][t]
            row = {
                "row": name,
                "model": mid,
                "metrics": {},
                "p_values": {},
                "n_test": r.n_test,
                "n_test_positive": r.n_test_positive,
                "skip_reason": r.skip_reason,
            }
            if r.skip_reason is None:
                row["metrics"] = {"AUC": r.auc.to_dict(), "AP": r.ap.to_dict()}
                if m > 0:
                    for metric_name, fn in (("AUC", roc_auc), ("AP", ap_score)):
                        p = stats.paired_permutation_test_scores(
                            fn, yt[keep], results[0][t].scores, r.scores, n_permutations=n_permutations, seed=seed
                        ).p_value
                        row["p_values"][metric_name] = None if np.isnan(p) else p
            rows.append(row)
    if evaluated:
        y_all = data.y[np.ix_(test, evaluated)]
        score_all = []
        for m in range(len(data.model_ids)):
            s = np.full(y_all.shape, np.nan)
            for j, t in enumerate(evaluated):
                s[~np.isnan(y_all[:, j]), j] = results[m][t].scores
            score_all.append(s)
        for m, mid in enumerate(data.model_ids):
            row = {
                "row": "mean",
                "model": mid,
                "metrics": {},
                "p_values": {},
                "n_test": int(test.size),
                "tasks": [data.names[t] for t in evaluated],
            }
            for metric_name, fn in (("AUC", roc_auc), ("AP", ap_score)):
                mean_fn = _mean_over_tasks(fn)
                est = stats.bootstrap_metric(mean_fn, y_all, score_all[m], n_resamples=n_resamples, seed=seed)
                row["metrics"][metric_name] = est.to_dict()
                if m > 0:
                    p = stats.paired_permutation_test_scores(
                        mean_fn, y_all, score_all[0], score_all[m], n_permutations=n_permutations, seed=seed
                    ).p_value
                    row["p_values"][metric_name] = None if np.isnan(p) else p
            rows.append(row)
    return Comparison(
        protocol=method,
        models=list(data.model_ids),
        n_scans=len(data.scan_ids),
        metrics=["AUC", "AP"],
        rows=[MetricRow(**r) for r in rows],
        settings={
            "statistics": stats.DEFINITION,
            "sources": data.sources,
            "split": split.to_dict(),
            "n_resamples": n_resamples,
            "n_permutations": n_permutations,
            "seed": seed,
        },
    )
