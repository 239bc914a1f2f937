"""Slices of a volume shown the radiological way, and figures saved without pyplot (safe in threads).

Axial images have anterior up and the patient's right on the image left; coronal and sagittal have superior up.
No torch here: pictures are drawn from numpy arrays.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from hctembed.config import Window
from hctembed.errors import InputError

if TYPE_CHECKING:  # matplotlib is imported by the figures that need it, not by the montage
    from matplotlib.figure import Figure

VIEWS = ("axial", "coronal", "sagittal")
#: Image-edge letters (top, bottom, left, right) of each view in the radiological convention.
ORIENTATION = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
_WINDOW_NAMES = {(40.0, 80.0): "brain", (80.0, 200.0): "subdural", (600.0, 2800.0): "bone"}


def display_slice(volume: np.ndarray, *, view: str, index: int) -> np.ndarray:
    """A slice of ``[Z, Y, X]`` (RAS index order) oriented for display with ``imshow(origin="upper")``.

    Axial ``[Y, X]``: anterior up, patient right on the image left. Coronal ``[Z, X]``: superior up, right on
    the left. Sagittal ``[Z, Y]``: superior up, anterior on the left. All three are the raw slice flipped
    on both axes, because every RAS axis increases towards the image's top or left.
    """
    if view == "axial":
        s = volume[index]
    elif view == "coronal":
        s = volume[:, index, :]
    elif view == "sagittal":
        s = volume[:, :, index]
    else:
        raise InputError(f"unknown view {view!r}; use one of {VIEWS}")
    return s[::-1, ::-1]


def display_point(voxel: tuple[int, int, int], *, shape: tuple[int, int, int], view: str) -> tuple[int, int]:
    """Where voxel ``(z, y, x)`` appears in :func:`display_slice` of ``view``: ``(row, col)``."""
    z, y, x = voxel
    nz, ny, nx = shape
    rows_cols = {
        "axial": (ny - 1 - y, nx - 1 - x),
        "coronal": (nz - 1 - z, nx - 1 - x),
        "sagittal": (nz - 1 - z, ny - 1 - y),
    }
    return rows_cols[view]


def slice_index(voxel: tuple[int, int, int], *, view: str) -> int:
    """The slice of ``view`` through voxel ``(z, y, x)``: z for axial, y for coronal, x for sagittal."""
    return voxel[VIEWS.index(view)]


def overlay_alpha(strength: np.ndarray) -> np.ndarray:
    """Opacity of a heat overlay from the map's strength in [0, 1]: clear below 25 %, at most 0.65, so the
    anatomy stays readable outside the attended regions."""
    return 0.65 * np.clip((strength - 0.25) / 0.75, 0.0, 1.0)


def window_name(window: Window) -> str:
    name = _WINDOW_NAMES.get((float(window.centre), float(window.width)), "window")
    return f"{name} (C {window.centre:g} / W {window.width:g} HU)"


def mark_orientation(ax, view: str) -> None:
    """Letters at the image edges: A/P, R/L, S/I."""
    top, bottom, left, right = ORIENTATION[view]
    style = {"color": "yellow", "fontsize": 9, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)


def save_figure(fig: Figure, out) -> dict[str, tuple[int, int, int, int]]:
    """Render with Agg and write PNG to ``out`` (path or binary file); returns each labelled axes' pixel box
    ``(left, top, right, bottom)`` in the saved image (axes labelled with ``ax.set_label``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    height = fig.bbox.height
    boxes = {}
    for ax in fig.axes:
        if ax.get_label() and not ax.get_label().startswith("<"):
            x0, y0, x1, y1 = ax.get_window_extent().extents
            boxes[ax.get_label()] = (round(x0), round(height - y1), round(x1), round(height - y0))
    if isinstance(out, str | Path):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    # the canvas is drawn already: write its pixels (savefig would draw the whole figure a second time)
    width, height_px = canvas.get_width_height()
    Image.frombuffer("RGBA", (width, height_px), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).save(out, format="png")
    return boxes
