"""Few-shot curves of several models on the same scans (FM-HCT Fig. 2): K positives + K negatives per task,
several draws, AUC and AP on the test part, and paired permutation P values against the first model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from hctembed.eval import stats
from hctembed.eval.classification import FEWSHOT_KS, FitScore, ap_score, fewshot_curve, roc_auc
from hctembed.eval.protocols import Aligned, _mean_over_tasks
from hctembed.eval.results import FewshotComparison, FewshotCurve
from hctembed.eval.splits import Split


def compare_fewshot(
    data: Aligned,
    *,
    fit_score: Callable[[int], FitScore],
    split: Split,
    ks: Sequence[int] = FEWSHOT_KS,
    n_draws: int = 5,
    n_resamples: int = 100,
    seed: int = 0,
    probe: str = "linear",
    n_permutations: int = 1000,
) -> FewshotComparison:
    """Few-shot curves per task and model (see :func:`hctembed.eval.classification.fewshot_curve`), and a
    ``mean`` curve over the tasks every model could be scored on. P values against the first model, two-sided:
    ``p_values``, paired permutation tests on the test scans' scores averaged over the draws (the draws held fixed);
    ``p_values_over_draws``, sign-flip tests on the per-draw metric differences (per task, and for the mean)."""
    points: dict[tuple[int, int], list] = {}
    for m in range(len(data.model_ids)):
        for t in range(len(data.names)):
            points[m, t] = fewshot_curve(
                fit_score(m),
                data.x[m],
                data.y[:, t],
                train=split.train,
                test=split.test,
                ks=ks,
                n_draws=n_draws,
                n_resamples=n_resamples,
                seed=seed,
            )
    curves = []
    for m, mid in enumerate(data.model_ids):
        for t, name in enumerate(data.names):
            test = split.test[~np.isnan(data.y[split.test, t])]
            rows = []
            for i, pt in enumerate(points[m, t]):
                row = pt.to_dict()
                ref = points[0, t][i]
                if m > 0 and pt.mean_scores is not None and ref.mean_scores is not None:
                    row["p_values"] = _paired_p(data.y[test, t], ref.mean_scores, pt.mean_scores, n_permutations, seed)
                    row["p_values_over_draws"] = _draws_p(
                        ref.auc_per_draw, pt.auc_per_draw, ref.ap_per_draw, pt.ap_per_draw, n_permutations, seed
                    )
                rows.append(row)
            curves.append({"task": name, "model": mid, "points": rows})
    curves += _fewshot_mean_curves(data, split, points, ks, n_permutations, seed)
    return FewshotComparison(
        models=list(data.model_ids),
        n_scans=len(data.scan_ids),
        curves=[FewshotCurve(**c) for c in curves],
        settings={
            "probe": probe,
            "statistics": stats.DEFINITION,
            "sources": data.sources,
            "split": split.to_dict(),
            "ks": list(ks),
            "n_draws": n_draws,
            "n_resamples": n_resamples,
            "n_permutations": n_permutations,
            "seed": seed,
        },
    )


def _paired_p(y, a, b, n_permutations: int, seed: int, *, over_tasks: bool = False) -> dict[str, float | None]:
    """P of AUC and AP, model ``b`` against ``a``; ``over_tasks``: of their mean over the columns of ``y [N, T]``."""
    out = {}
    for metric_name, fn in (("AUC", roc_auc), ("AP", ap_score)):
        metric = _mean_over_tasks(fn) if over_tasks else fn
        p = stats.paired_permutation_test_scores(metric, y, a, b, n_permutations=n_permutations, seed=seed).p_value
        out[metric_name] = None if np.isnan(p) else float(p)
    return out


def _draws_p(auc_a, auc_b, ap_a, ap_b, n_permutations: int, seed: int) -> dict[str, float | None]:
    """P of AUC and AP, ``b`` against ``a``, over the draws: a sign-flip test on the per-draw differences (the same
    draw's training scans for both models). Unlike :func:`_paired_p` it counts how much a draw of K scans moves the
    result; with few draws it cannot get small (3 draws: never below 0.25)."""
    out = {}
    for name, a, b in (("AUC", auc_a, auc_b), ("AP", ap_a, ap_b)):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        ok = ~(np.isnan(a) | np.isnan(b))
        p = stats.paired_permutation_test(b[ok], a[ok], n_permutations=n_permutations, seed=seed).p_value
        out[name] = None if np.isnan(p) else float(p)
    return out


def _fewshot_mean_curves(data, split, points, ks, n_permutations, seed) -> list[dict]:
    """Per model, the mean over tasks at each K (the tasks every model has a score for at that K): the mean of the
    task rows' values and CI bounds; its P value tests the mean-over-tasks metric of the draw-averaged scores."""
    n_models = len(data.model_ids)
    curves = [{"task": "mean", "model": mid, "points": []} for mid in data.model_ids]
    for i, k in enumerate(ks):
        tasks = [t for t in range(len(data.names)) if all(points[m, t][i].mean_scores is not None
                                                          for m in range(n_models))]  # fmt: skip
        if not tasks:
            for curve in curves:
                curve["points"].append({"K": k, "AUC": None, "AP": None, "tasks": [],
                                        "skip_reason": f"K={k}: no task could be scored by every model"})  # fmt: skip
            continue
        y_all = data.y[np.ix_(split.test, tasks)]
        matrices = []  # per model: draw-averaged test scores [n_test, tasks], NaN where the label is unknown
        for m in range(n_models):
            s = np.full(y_all.shape, np.nan)
            for j, t in enumerate(tasks):
                s[~np.isnan(y_all[:, j]), j] = points[m, t][i].mean_scores
            matrices.append(s)
        for m in range(n_models):
            row: dict = {"K": k, "tasks": [data.names[t] for t in tasks]}
            for metric_name in ("AUC", "AP"):
                # the mean over tasks of each task's point (value and CI bounds), so it reads like the task rows
                per_task = [points[m, t][i].to_dict()[metric_name] for t in tasks]
                row[metric_name] = {
                    key: float(np.mean([e[key] for e in per_task])) for key in ("value", "low", "high")
                } | {"ci": "mean over tasks of the task rows' values and 95% bounds"}
            if m > 0:
                row["p_values"] = _paired_p(y_all, matrices[0], matrices[m], n_permutations, seed, over_tasks=True)
                row["p_values_over_draws"] = _draws_p(
                    *(np.mean([getattr(points[mm, t][i], f"{metric}_per_draw") for t in tasks], axis=0)
                      for metric in ("auc", "ap") for mm in (0, m)),
                    n_permutations, seed,
                )  # fmt: skip
            curves[m]["points"].append(row | {"skip_reason": None})
    return curves
