"""The embedding map: a collection's vectors projected to 2D, each scan a point coloured by a label or a header
field (categories with counts, or a continuous scale; unknown values grey)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from hctembed.pictures.slices import save_figure


@dataclass(frozen=True)
class Colouring:
    """Per-point values (None = unknown) and whether they form categories or a continuous scale."""

    name: str
    values: list
    categorical: bool
    source: str


@dataclass(frozen=True)
class MapFigure:
    path: Path
    coords: np.ndarray  # [N, 2]
    legend: list[str]  # the drawn legend's entries (categorical), or [] with a colourbar
    method: str


def render_map(
    coords: np.ndarray,
    colours: Colouring,
    *,
    out: str | Path,
    title: str,
    method: str,
    width_px: int = 1000,
    height_px: int = 800,
) -> MapFigure:
    """Scatter ``coords`` ``[N, 2]`` coloured by ``colours``; PNG of ``width_px`` x ``height_px``."""
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    ax = fig.add_subplot()
    ax.set_label("map")
    fig.subplots_adjust(left=0.09, right=0.72, top=0.9, bottom=0.08)
    values = colours.values
    unknown = np.array([v is None for v in values])
    legend_entries: list[str] = []
    if colours.categorical:
        cats = sorted({v for v in values if v is not None}, key=lambda v: (isinstance(v, str), v))
        cmap = colormaps["tab10" if len(cats) <= 10 else "tab20"]
        for i, cat in enumerate(cats):
            sel = np.array([v == cat for v in values])
            label = f"{cat:g}" if isinstance(cat, float) else str(cat)
            ax.scatter(*coords[sel].T, s=30, color=cmap(i), label=f"{label} (n={int(sel.sum())})")
    else:
        nums = np.array([np.nan if v is None else float(v) for v in values])
        sc = ax.scatter(*coords[~unknown].T, c=nums[~unknown], s=30, cmap="viridis")
        fig.colorbar(sc, ax=ax, label=colours.name)
    if unknown.any():
        ax.scatter(*coords[unknown].T, s=30, color="lightgrey", marker="x", label=f"unknown (n={int(unknown.sum())})")
    if colours.categorical or unknown.any():
        legend = ax.legend(title=colours.name, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9)
        legend_entries = [t.get_text() for t in legend.get_texts()]
    axis = "PC" if method == "pca" else "UMAP "
    ax.set_xlabel(f"{axis}1")
    ax.set_ylabel(f"{axis}2")
    ax.set_title(f"{title}\n{len(coords)} scans, {method.upper()}, coloured by {colours.name} ({colours.source})")
    ax.grid(alpha=0.3)
    save_figure(fig, out)
    return MapFigure(path=Path(out), coords=coords, legend=legend_entries, method=method)
