"""A 2D map of a collection's stored embeddings, coloured by a label or a protocol field.

Projection: PCA (the centred vectors onto their two leading right singular vectors) by default; UMAP only
when the ``umap`` package is importable and asked for. Colours: a label of the ``labels`` table, a column
of a labels CSV (``manufacturer``, ``slice_thickness_mm``, ...), or a protocol field of ``scans.meta``.
Few distinct values (<= 12) or text give a categorical legend; more numeric values give a colourbar.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hctembed.errors import HctembedError
from hctembed.pictures.embedding_map import Colouring, MapFigure, render_map

log = logging.getLogger(__name__)

MAX_CATEGORIES = 12
#: Protocol names accepted by ``--color-by`` and the CSV columns / ``scans.meta`` keys that hold them.
ALIASES = {
    "manufacturer": ("manufacturer",),
    "slice_thickness": ("slice_thickness_mm", "slice_thickness"),
}


class MapError(HctembedError, ValueError):
    """The map cannot be drawn as asked (unknown colour field, no vectors, UMAP missing)."""


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
    from hctembed.io.labels import ROW, read_csv_rows

    fields, rows = read_csv_rows(path)
    if "scan_id" not in fields:
        raise MapError(f"{path}: no scan_id column")
    return {row["scan_id"].strip(): {k: v for k, v in row.items() if k != ROW} for row in rows}


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
    stored = store.labels.of(scan_ids)
    names = sorted({n for row in stored.values() for n in row})
    available += names
    if color_by in names:
        vals = [stored.get(s, {}).get(color_by) for s in scan_ids]
        vals = [None if v is None or v != v else ("positive" if v == 1 else "negative") for v in vals]
        return Colouring(color_by, vals, True, "labels table")
    meta = store.scans.meta()
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
    _, x, scan_ids = collection.vectors()
    coords = project(x, method=method)
    colours = colouring(store, scan_ids, color_by=color_by, labels_csv=labels_csv)
    return render_map(coords, colours, out=out, title=f"embeddings of {collection.model_id}", method=method)
