"""Training curves from a run's ``log.jsonl``: one panel per monitored quantity against the step."""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# (panel title, log keys drawn in it); panels without any logged value are left out
PANELS = (
    ("loss", ("loss",)),
    ("learning rate", ("lr", "lr_backbone", "lr_head")),
    ("teacher entropy / ln K (1 = uniform, 0 = one prototype)", ("teacher_entropy",)),
    ("teacher-student KL", ("teacher_student_kl",)),
    ("embedding std per dimension", ("embedding_std",)),
    ("SimCLR pairs (partner is nearest; CLS cosine of the two views)", ("pair_top1", "pair_cosine")),
    (
        "labelled monitor (kNN AUC, retrieval mAP)",
        ("monitor_knn_auc", "monitor_map", "monitor_knn_auc_patches", "monitor_map_patches"),
    ),
    ("validation AUC", ("val_auc",)),
)


def read_log(path: Path) -> list[dict]:
    """The rows of a ``log.jsonl`` (a partly written last line is ignored)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_training_curves(log_path: Path, out: Path, *, title: str = "") -> Path | None:
    """Write ``out`` (PNG) with a panel per logged quantity; None when the log has no rows yet."""
    rows = read_log(log_path)
    if not rows:
        return None
    panels = [(name, [k for k in keys if any(r.get(k) is not None for r in rows)]) for name, keys in PANELS]
    panels = [(name, keys) for name, keys in panels if keys]
    cols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // cols)
    fig = Figure(figsize=(6.0 * cols, 2.8 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, keys) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 30 else None, ms=3,
                    label=key)  # fmt: skip
        if name == "learning rate":  # linear: the warm-up starts at 0, which a log axis turns into a spike
            ax.set_ylim(bottom=0)
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
