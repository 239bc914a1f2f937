"""A 2D map of a collection's stored embeddings, coloured by a label or a protocol field.

Projection: PCA (the centred vectors onto their two leading right singular vectors) by default; UMAP only
when the ``umap`` package is importable and asked for. Colours: a label of the ``labels`` table, a column
of a labels CSV (``manufacturer``, ``slice_thickness_mm``, ...), or a protocol field of ``scans.meta``.
Few distinct values (<= 12) or text give a categorical legend; more numeric values give a colourbar.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from hctembed.errors import HctembedError
from hctembed.explain import save_figure

log = logging.getLogger(__name__)

MAX_CATEGORIES = 12
#: Protocol names accepted by ``--color-by`` and the CSV columns / ``scans.meta`` keys that hold them.
ALIASES = {
    "manufacturer": ("manufacturer",),
    "slice_thickness": ("slice_thickness_mm", "slice_thickness"),
}


class MapError(HctembedError, ValueError):
    """The map cannot be drawn as asked (unknown colour field, no vectors, UMAP missing)."""


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


def pca_2d(x: np.ndarray) -> np.ndarray:
    """``[N, D]`` -> ``[N, 2]``: centred vectors projected on the two leading principal axes."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def project(x: np.ndarray, *, method: str = "pca", seed: int = 0) -> np.ndarray:
    """``[N, D]`` -> ``[N, 2]`` by ``pca`` or ``umap`` (needs the optional ``umap-learn`` package)."""
    if len(x) < 3:
        raise MapError(f"a map needs at least 3 embeddings, the collection has {len(x)}")
    if method == "pca":
        return pca_2d(x)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise MapError("UMAP is not installed (pip install umap-learn); use --method pca") from None
        return umap.UMAP(n_components=2, random_state=seed, metric="cosine").fit_transform(x)
    raise MapError(f"unknown projection {method!r}; use pca or umap")


def _csv_columns(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "scan_id" not in (reader.fieldnames or []):
            raise MapError(f"{path}: no scan_id column")
        return {row["scan_id"].strip(): row for row in reader}


def _scan_meta(store) -> dict[str, dict]:
    rows = store.con.execute("SELECT scan_id, meta FROM scans").fetchall()
    return {scan_id: (json.loads(meta) if meta else {}) for scan_id, meta in rows}


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def colouring(store, scan_ids: list[str], *, color_by: str, labels_csv: str | Path | None = None) -> Colouring:
    """Values of ``color_by`` for ``scan_ids``: a labels-CSV column, else a stored label, else ``scans.meta``."""
    keys = ALIASES.get(color_by, (color_by,))
    available = []
    if labels_csv is not None:
        rows = _csv_columns(Path(labels_csv))
        columns = next(iter(rows.values()), {}).keys()
        available += list(columns)
        for key in keys:
            if key in columns:
                vals = [_number(rows[s][key].strip()) if s in rows and rows[s][key].strip() else None for s in scan_ids]
                return _classify(color_by, vals, source=f"{Path(labels_csv).name}:{key}")
    stored = store.labels(scan_ids)
    names = sorted({n for row in stored.values() for n in row})
    available += names
    if color_by in names:
        vals = [stored.get(s, {}).get(color_by) for s in scan_ids]
        vals = [None if v is None or v != v else ("positive" if v == 1 else "negative") for v in vals]
        return Colouring(color_by, vals, True, "labels table")
    meta = _scan_meta(store)
    meta_keys = sorted({k for m in meta.values() for k in m})
    available += meta_keys
    for key in keys:
        if key in meta_keys:
            return _classify(color_by, [_number(meta.get(s, {}).get(key)) for s in scan_ids], source=f"meta:{key}")
    if color_by == "slice_thickness" and "spacing_xyz" in meta_keys:
        vals = [meta.get(s, {}).get("spacing_xyz", [None] * 3)[2] for s in scan_ids]
        return _classify("z spacing (mm)", vals, source="meta:spacing_xyz")
    raise MapError(f"nothing called {color_by!r} to colour by; available: {', '.join(sorted(set(available)))}")


def _classify(name: str, values: list, *, source: str) -> Colouring:
    present = {v for v in values if v is not None}
    numeric = all(isinstance(v, float | int) for v in present)
    categorical = not numeric or len(present) <= MAX_CATEGORIES
    return Colouring(name, values, categorical, source)


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


def embedding_map(
    store,
    *,
    color_by: str,
    out: str | Path,
    labels_csv: str | Path | None = None,
    model: str | None = None,
    method: str = "pca",
) -> MapFigure:
    """Project a collection's vectors to 2D and draw them coloured by ``color_by``."""
    collection = store.resolve_collection(model_id=model)
    _, x, scan_ids = store.vectors(collection)
    coords = project(x, method=method)
    colours = colouring(store, scan_ids, color_by=color_by, labels_csv=labels_csv)
    return render_map(coords, colours, out=out, title=f"embeddings of {collection.model_id}", method=method)
