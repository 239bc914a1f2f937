"""Write a protocol's results: ``results.json``, a Markdown table (mean [95% CI], P vs the first model) and
PNG plots (per-label bars with CI error bars, P@K, few-shot curves).

Plots use ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot state), so they are safe in
threads and in library code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """JSON-ready values: NaN/inf become null, numpy scalars and arrays become numbers and lists."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _estimate(e: dict | None) -> str:
    if not e or e.get("value") is None:
        return "–"
    return f"{_num(e['value'])} [{_num(e.get('low'))}, {_num(e.get('high'))}]"


def _p(p: float | None) -> str:
    if p is None:
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown_table(results: dict) -> str:
    """A Markdown table: mean [95% CI] per row and model, P value (paired permutation) vs the first model."""
    first = results["models"][0]
    if results["protocol"] == "fewshot":
        lines = [
            f"Few-shot ({results.get('probe', 'linear')} probe), {results['n_draws']} draws per K; "
            "mean over draws [95% CI]",
            "",
            "| task | model | K | AUC | AP | note |",
            "|---|---|---|---|---|---|",
        ]
        for curve in results["curves"]:
            for pt in curve["points"]:
                lines.append(
                    f"| {curve['task']} | {curve['model']} | {pt['K']} | {_estimate(pt['AUC'])} | "
                    f"{_estimate(pt['AP'])} | {pt['skip_reason'] or ''} |"
                )
        return "\n".join(lines) + "\n"
    metrics = results["metrics"]
    head = "| row | model | " + " | ".join(f"{m} | P ({m})" for m in metrics) + " | note |"
    lines = [
        f"{results['protocol']}: mean [95% CI], P = two-sided paired permutation test vs {first}",
        "",
        head,
        "|" + "---|" * (3 + 2 * len(metrics)),
    ]
    for row in results["rows"]:
        cells = []
        for m in metrics:
            cells.append(_estimate(row["metrics"].get(m)))
            cells.append(_p(row["p_values"].get(m)))
        note = row.get("skip_reason") or ""
        lines.append(f"| {row['row']} | {row['model']} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines) + "\n"


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


def write_report(out_dir: Path, results: dict) -> list[Path]:
    """``results.json``, ``results.md`` and the protocol's PNGs under ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "results.md"]
    written[0].write_text(json.dumps(plain(results), indent=2))
    written[1].write_text(markdown_table(results))
    protocol = results["protocol"]
    if protocol == "retrieval":
        written.append(plot_bars(out_dir / "map_per_label.png", results, metric="mAP"))
        written.append(plot_precision_at_k(out_dir / "precision_at_k.png", results))
    elif protocol == "fewshot":
        written.append(plot_fewshot(out_dir / "fewshot_auc.png", results, metric="AUC"))
        written.append(plot_fewshot(out_dir / "fewshot_ap.png", results, metric="AP"))
    else:
        written.append(plot_bars(out_dir / "auc_per_task.png", results, metric="AUC"))
        written.append(plot_bars(out_dir / "ap_per_task.png", results, metric="AP"))
    return written
