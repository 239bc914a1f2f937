"""Write a protocol's results: ``results.json``, a Markdown table (mean [95% CI], P vs the first model) and
PNG plots (per-label bars with CI error bars, P@K, few-shot curves).

Plots use ``matplotlib.figure.Figure`` with the Agg canvas directly (no pyplot state), so they are safe in
threads and in library code.
"""

from __future__ import annotations

import math
from pathlib import Path

from hctembed.json_values import json_safe, write_json
from hctembed.pictures.report_plots import plot_bars, plot_fewshot, plot_precision_at_k


def flat_rows(results) -> list[dict]:
    """One flat dict per (row, model): metric value, CI bounds, and P vs the first model (typed results or the
    dict of a results.json)."""
    results = json_safe(results)
    out = []
    if results["protocol"] == "fewshot":
        for curve in results["curves"]:
            for pt in curve["points"]:
                flat = {"task": curve["task"], "model": curve["model"], "K": pt["K"]}
                for m in ("AUC", "AP"):
                    e = pt[m] or {}
                    flat.update({m: e.get("value"), f"{m}_low": e.get("low"), f"{m}_high": e.get("high")})
                    if m in (pt.get("p_values") or {}):
                        flat[f"P_{m}"] = pt["p_values"][m]
                    if m in (pt.get("p_values_over_draws") or {}):
                        flat[f"P_draws_{m}"] = pt["p_values_over_draws"][m]
                flat["skip_reason"] = pt["skip_reason"]
                out.append(flat)
        return out
    for row in results["rows"]:
        flat = {"row": row["row"], "model": row["model"]}
        for m in results["metrics"]:
            e = row["metrics"].get(m) or {}
            flat.update({m: e.get("value"), f"{m}_low": e.get("low"), f"{m}_high": e.get("high")})
            if m in row["p_values"]:
                flat[f"P_{m}"] = row["p_values"][m]
            if m == "mAP" and row.get("chance") is not None:
                flat["chance"] = row["chance"]
        if row.get("skip_reason"):
            flat["skip_reason"] = row["skip_reason"]
        out.append(flat)
    return out


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


def markdown_table(results) -> str:
    """A Markdown table: mean [95% CI] per row and model, P value (paired permutation) vs the first model."""
    results = json_safe(results)
    first = results["models"][0]
    if results["protocol"] == "fewshot":
        lines = [
            f"Few-shot ({results.get('probe', 'linear')}), {results['n_draws']} draws per K; "
            f"mean over draws [95% CI]; P: paired permutation vs {first} on the draw-averaged test scores (the draws "
            "held fixed); P over draws: sign-flip test of the per-draw differences (counts what a draw of K scans "
            "changes; with few draws it cannot get small)",
            "",
            "| task | model | K | AUC | P (AUC) | P over draws (AUC) | AP | P (AP) | P over draws (AP) | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for curve in results["curves"]:
            for pt in curve["points"]:
                p, pd = pt.get("p_values") or {}, pt.get("p_values_over_draws") or {}
                lines.append(
                    f"| {curve['task']} | {curve['model']} | {pt['K']} | {_estimate(pt['AUC'])} | {_p(p.get('AUC'))} | "
                    f"{_p(pd.get('AUC'))} | {_estimate(pt['AP'])} | {_p(p.get('AP'))} | {_p(pd.get('AP'))} | "
                    f"{pt['skip_reason'] or ''} |"
                )
        return "\n".join(lines) + "\n"
    metrics = results["metrics"]
    chance = any(row.get("chance") is not None for row in results["rows"])
    head = "| row | model | " + " | ".join(f"{m} | P ({m})" for m in metrics) + (" | chance" if chance else "")
    lines = [
        f"{results['protocol']}: mean [95% CI], P = two-sided paired permutation test vs {first}"
        + ("; chance = the mAP of a random ranking of the same galleries" if chance else ""),
        "",
        head + " | note |",
        "|" + "---|" * (3 + 2 * len(metrics) + chance),
    ]
    for row in results["rows"]:
        cells = []
        for m in metrics:
            cells.append(_estimate(row["metrics"].get(m)))
            cells.append(_p(row["p_values"].get(m)))
        if chance:
            cells.append(_num(row.get("chance")))
        note = row.get("skip_reason") or ""
        lines.append(f"| {row['row']} | {row['model']} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, results) -> list[Path]:
    """``results.json``, ``results.md`` and the protocol's PNGs under ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = json_safe(results)  # the plain form: what results.json holds, and what the plots read
    written = [out_dir / "results.json", out_dir / "results.md"]
    write_json(written[0], results)
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
