"""Benchmark plots: per-label bars with 95% CI whiskers, Precision@K, few-shot curves (numpy and matplotlib's Agg
canvas only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _err(e: dict | None) -> tuple[float, float, float]:
    if not e or e.get("value") is None:
        return (np.nan, 0.0, 0.0)
    v = e["value"]
    low = e.get("low") if e.get("low") is not None else v
    high = e.get("high") if e.get("high") is not None else v
    return (v, max(v - low, 0.0), max(high - v, 0.0))


def plot_bars(path: Path, results: dict, *, metric: str) -> Path:
    """Grouped bars: one group per row (label), one bar per model, 95% CI error bars."""
    rows = [r for r in results["rows"] if metric in r["metrics"]]
    names = list(dict.fromkeys(r["row"] for r in rows))
    models = results["models"]
    fig = _figure(max(6.0, 1.2 * len(names) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(models), 1)
    for m, model in enumerate(models):
        vals = [
            _err(next((r["metrics"][metric] for r in rows if r["row"] == n and r["model"] == model), None))
            for n in names
        ]
        x = np.arange(len(names)) + (m - (len(models) - 1) / 2) * width
        ax.bar(
            x,
            [v[0] for v in vals],
            width,
            yerr=np.array([[v[1] for v in vals], [v[2] for v in vals]]),
            capsize=3,
            label=model,
        )
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{results['protocol']}: {metric} per label")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_precision_at_k(path: Path, results: dict) -> Path:
    """Mean-row P@K against K per model with 95% CI error bars (retrieval)."""
    ks = results["ks"]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for model in results["models"]:
        row = next(r for r in results["rows"] if r["row"] == "mean" and r["model"] == model)
        vals = [_err(row["metrics"].get(f"P@{k}")) for k in ks]
        ax.errorbar(
            ks,
            [v[0] for v in vals],
            yerr=np.array([[v[1] for v in vals], [v[2] for v in vals]]),
            marker="o",
            capsize=3,
            label=model,
        )
    ax.set_xlabel("K")
    ax.set_ylabel("mean P@K over labels (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(ks)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_fewshot(path: Path, results: dict, *, metric: str = "AUC") -> Path:
    """Few-shot curves: one panel per task, ``metric`` against K (log scale), one line per model, CI band."""
    tasks = list(dict.fromkeys(c["task"] for c in results["curves"]))
    cols = min(3, len(tasks))
    nrows = math.ceil(len(tasks) / cols)
    fig = _figure(4.0 * cols, 3.2 * nrows)
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for curve in (c for c in results["curves"] if c["task"] == task):
            pts = [p for p in curve["points"] if p[metric] is not None]
            if not pts:
                continue
            k = [p["K"] for p in pts]
            ax.plot(k, [p[metric]["value"] for p in pts], marker="o", label=curve["model"])
            ax.fill_between(
                k,
                [_err(p[metric])[0] - _err(p[metric])[1] for p in pts],
                [_err(p[metric])[0] + _err(p[metric])[2] for p in pts],
                alpha=0.2,
            )
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("K (positives = negatives)")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.05)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path
